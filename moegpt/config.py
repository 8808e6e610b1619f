"""Run configuration: dataclasses with strict `from_dict`, `to_dict`, TOML load/save and validation.

A run is four sections (`model`, `moe`, `data`, `train`); `RunConfig.to_toml()` writes a file that
`moegpt train --config` reads back into an equal config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w
import tomllib

from moegpt.errors import MoegptError

ACTIVATIONS = ("swiglu", "gelu", "relu", "linear")
DISPATCH_BACKENDS = ("sorted", "loop", "padded", "grouped", "bucketed")


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

    @property
    def resolved_ffn_hidden(self) -> int:
        return self.ffn_hidden or 4 * self.n_embd

    def problems(self) -> list[str]:
        out = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name} must be > 0 (got {getattr(self, name)})")
        if self.n_head > 0 and self.n_embd % self.n_head:
            out.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.ffn_hidden < 0:
            out.append(f"model.ffn_hidden must be >= 0 (got {self.ffn_hidden})")
        return out


@dataclass
class MoEConfig:
    variant: str = "topk"
    n_expert: int = 8
    top_k: int = 2
    # Hidden size of one routed expert; 0 = equal active FLOPs with the dense FFN
    # (ffn_hidden divided by the number of experts a token runs through).
    expert_hidden: int = 0
    activation: str = "swiglu"
    n_shared: int = 1  # only the `shared` variant uses it
    capacity_factor: float = 0.0  # <= 0: dropless (switch defaults to 1.25 when left at 0)
    # Which layers get a MoE FFN: layer i is MoE iff i >= first_dense and (i - first_dense) % moe_every == 0.
    moe_every: int = 1
    first_dense: int = 0
    normalize_topk: bool = True
    router_jitter: float = 0.0  # multiplicative input jitter in training (Switch); 0 = off
    balance_coef: float = 0.01
    z_coef: float = 0.001
    seq_balance_coef: float = 0.0  # aux-free's optional sequence-wise balance loss
    bias_update_rate: float = 0.001  # aux-free's gamma
    n_group: int = 1  # aux-free group-limited routing (DeepSeek-V3); 1 = off
    topk_group: int = 1
    slots_per_expert: int = 1  # soft MoE
    dispatch: str = "sorted"

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.variant == "dense" or layer_idx < self.first_dense:
            return False
        return (layer_idx - self.first_dense) % self.moe_every == 0

    def active_experts_per_token(self) -> float:
        """Routed experts a token runs through on average (for active-parameter accounting)."""
        if self.variant == "dense":
            return 1.0
        if self.variant == "basic":
            return float(self.n_expert)
        if self.variant == "soft":  # slots per sequence; GPT.num_params divides by the context length
            return float(self.slots_per_expert * self.n_expert)
        if self.variant == "switch":
            return 1.0
        if self.variant == "expert-choice":
            return float(self.top_k) * (self.capacity_factor if self.capacity_factor > 0 else 1.0)
        return float(self.top_k)

    def resolved_expert_hidden(self, ffn_hidden: int) -> int:
        if self.expert_hidden:
            return self.expert_hidden
        if self.variant == "soft":
            # A soft MoE layer's cost depends on sequence length; size experts like top-k ones.
            share = self.top_k
        elif self.variant == "shared":
            share = self.top_k + self.n_shared
        else:
            share = self.active_experts_per_token()
        return max(1, int(round(ffn_hidden / share)))

    def resolved_capacity_factor(self) -> float:
        if self.variant == "switch" and self.capacity_factor <= 0:
            return 1.25
        if self.variant == "expert-choice" and self.capacity_factor <= 0:
            return 1.0
        return self.capacity_factor

    def problems(self) -> list[str]:
        from moegpt.moe import VARIANTS  # local: the registry imports this module

        out = []
        if self.variant not in VARIANTS:
            out.append(f"unknown MoE variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
            return out
        if self.n_expert < 1:
            out.append(f"moe.n_expert must be >= 1 (got {self.n_expert})")
        elif self.variant not in ("dense", "basic", "soft", "switch") and not 1 <= self.top_k <= self.n_expert:
            out.append(f"moe.top_k must be in [1, n_expert={self.n_expert}] (got {self.top_k})")
        elif self.variant == "soft" and self.top_k < 1:  # soft sizes its experts like top-k ones
            out.append(f"moe.top_k must be >= 1 (got {self.top_k})")
        if self.activation not in ACTIVATIONS:
            out.append(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.dispatch not in DISPATCH_BACKENDS:
            out.append(f"unknown dispatch backend {self.dispatch!r}; valid: {', '.join(DISPATCH_BACKENDS)}")
        if not math.isfinite(self.capacity_factor):
            out.append(f"moe.capacity_factor must be finite (got {self.capacity_factor})")
        elif self.variant == "expert-choice" and self.capacity_factor < 0:
            out.append(f"moe.capacity_factor must be >= 0 for expert-choice (got {self.capacity_factor})")
        if self.expert_hidden < 0:
            out.append(f"moe.expert_hidden must be >= 0 (got {self.expert_hidden})")
        if self.variant == "shared" and self.n_shared < 0:
            out.append(f"moe.n_shared must be >= 0 (got {self.n_shared})")
        if self.moe_every < 1:
            out.append(f"moe.moe_every must be >= 1 (got {self.moe_every})")
        if self.first_dense < 0:
            out.append(f"moe.first_dense must be >= 0 (got {self.first_dense})")
        for name in ("balance_coef", "z_coef", "seq_balance_coef", "bias_update_rate", "router_jitter"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                out.append(f"moe.{name} must be a finite number >= 0 (got {value})")
        if self.variant == "aux-free":
            if self.n_group < 1 or self.n_expert % self.n_group:
                out.append(f"moe.n_group ({self.n_group}) must be >= 1 and divide n_expert ({self.n_expert})")
            elif not 1 <= self.topk_group <= self.n_group:
                out.append(f"moe.topk_group must be in [1, n_group={self.n_group}] (got {self.topk_group})")
            elif self.n_group > 1 and self.top_k > self.topk_group * (self.n_expert // self.n_group):
                out.append("moe.top_k exceeds the experts in the kept groups (topk_group * n_expert / n_group)")
        if self.variant == "soft" and self.slots_per_expert < 1:
            out.append(f"moe.slots_per_expert must be >= 1 (got {self.slots_per_expert})")
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
        if self.precision not in ("auto", "fp32", "bf16"):
            out.append(f"train.precision must be auto, fp32 or bf16 (got {self.precision!r})")
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
        Path(path).write_text(self.to_toml())

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise MoegptError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise MoegptError(f"malformed TOML in {path}: {err}") from None
        return cls.from_dict(raw)

    def problems(self) -> list[str]:
        return self.model.problems() + self.moe.problems() + self.train.problems()

    def validate(self) -> RunConfig:
        problems = self.problems()
        if problems:
            raise MoegptError("; ".join(problems))
        return self


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


def apply_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one `section.key=value` override (the value is parsed as the field's type)."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise MoegptError(f"--set expects section.key=value (got {assignment!r})")
    dotted, value = assignment.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in {f.name for f in fields(cfg)}:
        raise MoegptError(f"unknown config section {section!r} in --set {assignment!r}; "
                          "valid: model, moe, data, train")
    target = getattr(cfg, section)
    hints = get_type_hints(type(target))
    if key not in hints:
        raise MoegptError(f"unknown key {dotted!r} in --set; valid keys of [{section}]: {', '.join(hints)}")
    setattr(target, key, coerce_value(hints[key], value.strip(), dotted, from_text=True))
