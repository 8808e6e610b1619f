"""Run configuration: dataclasses with strict `from_dict`, `to_dict`, TOML load/save and validation.

A run is four sections (`model`, `moe`, `data`, `train`); `RunConfig.to_toml()` writes a file that
`moegpt train --config` reads back into an equal config.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from moegpt.errors import MoegptError
from moegpt.safe_io import write_text_atomic

# The one list of each (torch-free, so the CLI's --help can show them without importing torch).
ACTIVATIONS = ("swiglu", "gelu", "relu", "linear")
DISPATCH_BACKENDS = ("sorted", "bucketed", "padded", "grouped", "loop")  # the default first
PRECISIONS = ("auto", "fp32", "bf16")


def precision_problem(value: str, name: str = "precision", choices: tuple[str, ...] = PRECISIONS) -> str | None:
    """The one check of a precision setting; `name` is how the caller's user knows it (a config key, a flag)."""
    if value in choices:
        return None
    return f"{name} must be {', '.join(choices[:-1])} or {choices[-1]} (got {value!r})"


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    # Hidden size of the dense FFN; MoE experts default to a share of it (see MoEConfig.expert_hidden).
    ffn_hidden: int = 0  # 0 = 4 * n_embd
    # Trunk: gpt2 = learned positions, LayerNorm, tied head; llama = RoPE, RMSNorm, no biases (moegpt.trunk).
    arch: str = "gpt2"
    attention: str = "mha"  # mha, or mla = DeepSeek's Multi-head Latent Attention (llama trunk only)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # RMSNorm's epsilon (llama trunk); gpt2's LayerNorm keeps torch's 1e-5
    tie_embeddings: bool = True  # output head shares the token embedding's weight
    # MLA (moegpt.mla): 0 = queries straight from the residual (no low-rank query path)
    q_lora_rank: int = 0
    kv_lora_rank: int = 64  # width of the compressed latent c_kv that the KV cache stores
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # the decoupled rotary part of a query head, and of the one shared rotary key
    v_head_dim: int = 32
    mla_absorb: bool = True  # decode steps fold W_UK into the query and W_UV into the output

    @property
    def resolved_ffn_hidden(self) -> int:
        return self.ffn_hidden or 4 * self.n_embd

    def problems(self) -> list[str]:
        out = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name} must be > 0 (got {getattr(self, name)})")
        if self.n_head > 0 and self.n_embd % self.n_head and self.attention != "mla":
            out.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.ffn_hidden < 0:
            out.append(f"model.ffn_hidden must be >= 0 (got {self.ffn_hidden})")
        return out + trunk_problems(self)


@dataclass
class MoEConfig:
    variant: str = "topk"
    n_expert: int = 8
    top_k: int = 2
    # Hidden size of one routed expert; 0 = equal active FLOPs with the dense FFN
    # (ffn_hidden divided by the number of experts a token runs through).
    expert_hidden: int = 0
    activation: str = "swiglu"
    n_shared: int = 1  # always-on shared experts (the variants that have them)
    # < 0: the variant's default (switch 1.25, expert-choice 1.0, the others dropless); 0: dropless for every
    # token-choice variant; > 0: each expert takes at most ceil(capacity_factor * N * K / E) assignments.
    capacity_factor: float = -1.0
    # Which layers get a MoE FFN: layer i is MoE iff i >= first_dense and (i - first_dense) % moe_every == 0.
    moe_every: int = 1
    first_dense: int = 0
    normalize_topk: bool = True
    router_jitter: float = 0.0  # multiplicative input jitter in training (Switch); 0 = off
    balance_coef: float = 0.01
    z_coef: float = 0.001
    seq_balance_coef: float = 0.0  # optional sequence-wise balance loss (variants that define one)
    bias_update_rate: float = 0.001  # gamma of a load-driven selection bias (DeepSeek-V3)
    n_group: int = 1  # group-limited routing (DeepSeek-V3); 1 = off
    topk_group: int = 1
    slots_per_expert: int = 1  # slots per expert (Soft MoE)
    dispatch: str = "sorted"
    # Router conventions of the DeepSeek/Qwen references (defaults keep moegpt's behaviour):
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' gates (DeepSeek-V3 uses 2.5)
    shared_gate: bool = False  # `shared`: scale the shared experts by sigmoid(x w) per token (Qwen2-MoE)

    def problems(self) -> list[str]:
        """Checks that hold for every variant; each variant adds its own (moegpt.moe.variant_problems)."""
        out = []
        if self.n_expert < 1:
            out.append(f"moe.n_expert must be >= 1 (got {self.n_expert})")
        if not math.isfinite(self.capacity_factor):
            out.append(f"moe.capacity_factor must be finite (got {self.capacity_factor})")
        if self.expert_hidden < 0:
            out.append(f"moe.expert_hidden must be >= 0 (got {self.expert_hidden})")
        if self.moe_every < 1:
            out.append(f"moe.moe_every must be >= 1 (got {self.moe_every})")
        if self.first_dense < 0:
            out.append(f"moe.first_dense must be >= 0 (got {self.first_dense})")
        for name in ("balance_coef", "z_coef", "seq_balance_coef", "bias_update_rate", "router_jitter"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                out.append(f"moe.{name} must be a finite number >= 0 (got {value})")
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            out.append(f"moe.routed_scaling_factor must be a finite number > 0 (got {self.routed_scaling_factor})")
        return out


TRUNKS = ("gpt2", "llama")
ATTENTIONS = ("mha", "mla")


def trunk_problems(m: ModelConfig) -> list[str]:
    """What is wrong with the trunk and attention keys (model.arch, model.attention and their dimensions)."""
    out = []
    if m.arch not in TRUNKS:
        out.append(f"unknown model.arch {m.arch!r}; valid: {', '.join(TRUNKS)}")
    if m.attention not in ATTENTIONS:
        out.append(f"unknown model.attention {m.attention!r}; valid: {', '.join(ATTENTIONS)}")
    if out:
        return out
    if m.arch == "llama":
        if m.bias:
            out.append("the llama trunk has no biases: model.bias must be false")
        if not (math.isfinite(m.rope_theta) and m.rope_theta > 0):
            out.append(f"model.rope_theta must be a finite number > 0 (got {m.rope_theta})")
        if not (math.isfinite(m.norm_eps) and m.norm_eps > 0):
            out.append(f"model.norm_eps must be a finite number > 0 (got {m.norm_eps})")
    if m.attention == "mla":
        if m.arch != "llama":
            out.append("model.attention = 'mla' needs model.arch = 'llama' (MLA's decoupled keys are rotary; "
                       "the gpt2 trunk has learned positions)")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(m, name) <= 0:
                out.append(f"model.{name} must be > 0 (got {getattr(m, name)})")
        if m.q_lora_rank < 0:
            out.append(f"model.q_lora_rank must be >= 0 (got {m.q_lora_rank}; 0 = no low-rank query)")
        if m.qk_rope_head_dim <= 0 or m.qk_rope_head_dim % 2:
            out.append(f"model.qk_rope_head_dim must be even and > 0 (got {m.qk_rope_head_dim})")
    elif m.arch == "llama" and m.n_head > 0 and m.n_embd % m.n_head == 0 and (m.n_embd // m.n_head) % 2:
        out.append(f"RoPE rotates pairs: the head dimension n_embd / n_head = {m.n_embd // m.n_head} must be even")
    return out


@dataclass
class DataConfig:
    name: str = "stdlib"  # folder under data_root prepared by `moegpt prepare`
    data_root: str = "data"


@dataclass
class TrainConfig:
    name: str = ""  # run name; "" = derived from the variant
    runs_root: str = "runs"
    max_iters: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 50
    lr_decay_iters: int = 0  # length of the cosine schedule; 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    ckpt_interval: int = 250
    keep_ckpts: int = 2
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    # Processes that split each MoE layer's experts (torchrun); 1 = every process holds every expert.
    # With it > 1, batch_size is the global batch, split evenly over all processes.
    expert_parallel: int = 1

    def problems(self) -> list[str]:
        out = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"train.lr must be a finite number > 0 (got {self.lr})")
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters",
                     "log_interval", "ckpt_interval", "keep_ckpts"):
            if getattr(self, name) <= 0:
                out.append(f"train.{name} must be > 0 (got {getattr(self, name)})")
        if self.lr_decay_iters < 0:
            out.append(f"train.lr_decay_iters must be >= 0 (got {self.lr_decay_iters})")
        if self.warmup_iters < 0:
            out.append(f"train.warmup_iters must be >= 0 (got {self.warmup_iters})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"train.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            out.append(f"train.grad_clip must be a finite number >= 0 (got {self.grad_clip})")
        if not self.device or self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            out.append(f"train.device must be auto, cpu, cuda[:N] or mps (got {self.device!r})")
        if problem := precision_problem(self.precision, "train.precision"):
            out.append(problem)
        if self.expert_parallel < 1:
            out.append(f"train.expert_parallel must be >= 1 (got {self.expert_parallel})")
        return out


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- dict / TOML -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise MoegptError("config must be a table of sections")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise MoegptError(f"unknown config section(s): {', '.join(unknown)}; valid: model, moe, data, train")
        sections = {}
        for f in fields(cls):
            section_cls = get_type_hints(cls)[f.name]
            sections[f.name] = section_from_dict(section_cls, raw.get(f.name, {}), f.name)
        return cls(**sections)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_toml())

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_toml(path))

    def problems(self) -> list[str]:
        """The generic checks of every section; `moegpt.moe.validate_run_config` adds the variant's own."""
        return self.model.problems() + self.moe.problems() + self.train.problems()


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables, or MoegptError naming the file (missing, unreadable or malformed)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise MoegptError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise MoegptError(f"malformed TOML in {path}: {err}") from None


def section_from_dict(section_cls: type, raw: Any, section: str) -> Any:
    """Build one section dataclass from a dict: unknown keys and wrong types raise, naming them."""
    if not isinstance(raw, dict):
        raise MoegptError(f"config section [{section}] must be a table")
    known = {f.name: f for f in fields(section_cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise MoegptError(
            f"unknown key(s) in [{section}]: {', '.join(unknown)}; valid: {', '.join(known)}")
    hints = get_type_hints(section_cls)
    values = {name: coerce_value(hints[name], value, f"{section}.{name}") for name, value in raw.items()}
    return section_cls(**values)


def coerce_value(expected: type, value: Any, key: str, from_text: bool = False) -> Any:
    """Check (and widen int->float) a config value against its declared type.

    Strings are parsed into numbers or booleans only when the value came from a command line
    (`from_text`); a TOML file must use the right types.
    """
    if isinstance(value, str) and not from_text and expected is not str:
        raise MoegptError(f"{key} must be of type {expected.__name__} (got {value!r})")
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
    raise MoegptError(f"{key} must be of type {expected.__name__} (got {value!r})")


def apply_override(cfg: RunConfig, assignment: str, origin: str = "--set") -> None:
    """Apply one `section.key=value` override (the value is parsed as the field's type); errors name `origin`,
    where the assignment came from."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise MoegptError(f"{origin} expects section.key=value (got {assignment!r})")
    dotted, value = assignment.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in {f.name for f in fields(cfg)}:
        raise MoegptError(f"unknown config section {section!r} in {origin} {assignment!r}; "
                          "valid: model, moe, data, train")
    target = getattr(cfg, section)
    hints = get_type_hints(type(target))
    if key not in hints:
        raise MoegptError(f"unknown key {dotted!r} in {origin}; valid keys of [{section}]: {', '.join(hints)}")
    setattr(target, key, coerce_value(hints[key], value.strip(), dotted, from_text=True))
