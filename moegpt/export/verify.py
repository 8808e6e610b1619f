"""Load an exported folder in transformers and compare it with the run it came from.

Three comparisons on the run's held-out (val) tokens: logits of a batch (fp32, max absolute difference),
greedy generation from a prompt, and the exported tokenizer's ids against moegpt's on the val text.
Needs the `hf` extra (transformers); moegpt's core never imports it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moegpt.data import TokenDataset
from moegpt.errors import MoegptError
from moegpt.generate import generate
from moegpt.runs import LoadedRun
from moegpt.tokenizer import EOT

LOGIT_TOLERANCE = 1e-4  # fp32
PROMPT_TOKENS, GREEDY_TOKENS = 8, 32
TOKENIZER_SAMPLE_TOKENS = 20_000


@dataclass
class VerifyReport:
    loading_problems: list[str] = field(default_factory=list)
    max_logit_diff: float = float("nan")
    logit_shape: tuple[int, int] = (0, 0)
    greedy_tokens: int = 0
    greedy_same: bool = False
    tokenizer_tokens: int = 0
    tokenizer_same: bool = False

    @property
    def passed(self) -> bool:
        return (not self.loading_problems and self.max_logit_diff <= LOGIT_TOLERANCE and self.greedy_same
                and self.tokenizer_same)

    def summary(self) -> str:
        parts = [f"max |logit difference| {self.max_logit_diff:.3g} over {self.logit_shape[0]}x{self.logit_shape[1]} "
                 f"val tokens (tolerance {LOGIT_TOLERANCE:g})",
                 f"greedy {self.greedy_tokens} tokens {'identical' if self.greedy_same else 'DIFFER'}",
                 f"tokenizer on {self.tokenizer_tokens} val tokens {'identical' if self.tokenizer_same else 'DIFFERS'}"]
        if self.loading_problems:
            parts.insert(0, "loading: " + "; ".join(self.loading_problems))
        return ", ".join(parts)


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MoegptError("checking an export needs transformers: pip install 'moegpt[hf]'") from None
    # its progress bars and advice (sequence longer than the context, ...) would bury the one-line result
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def load_exported(out: Path) -> tuple[Any, list[str]]:
    """The transformers model of `out` in fp32 eval mode, and what its loading reported missing or extra."""
    transformers = import_transformers()
    with warnings.catch_warnings():  # DeepSeek without shared experts builds an empty MLP, and torch says so
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), output_loading_info=True, dtype=torch.float32)
    problems = [f"{kind}: {', '.join(sorted(map(str, keys))[:5])}" for kind, keys in info.items()
                if keys and kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")]
    return model.eval(), problems


def val_batch(run: LoadedRun, batch_size: int, seed: int) -> torch.Tensor:
    ds = TokenDataset(run.prepared_data_dir())
    x, _ = ds.get_batch("val", batch_size, run.config.model.block_size, torch.Generator().manual_seed(seed))
    return x


@torch.no_grad()
def greedy(ours: torch.nn.Module, theirs: Any, prompt: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """moegpt's and transformers' greedy continuations (no stop at end-of-text: moegpt has none)."""
    # as keyword arguments: a GenerationConfig object's None fields fall back to the model's defaults (its
    # end-of-text id would stop generation early)
    expected = generate(ours, prompt, n, temperature=0.0).tokens_BL[0, prompt.shape[1]:].tolist()
    got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    return expected, got


def tokenizer_matches(out: Path, run: LoadedRun) -> tuple[int, bool]:
    """Encode the val text, document by document, with both tokenizers; (tokens compared, identical)."""
    transformers = import_transformers()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    tok = run.tokenizer()
    ids = TokenDataset(run.prepared_data_dir()).tokens("val")[:TOKENIZER_SAMPLE_TOKENS].tolist()
    documents = tok.decode(ids).split(EOT)  # a literal "<|endoftext|>" is a special token in transformers
    expected = [tok.encode(text) for text in documents]
    got = [hf_tok.encode(text, add_special_tokens=False) for text in documents]
    return sum(map(len, expected)), expected == got


def verify_export(out: str | Path, run: LoadedRun, batch_size: int = 4, seed: int = 0) -> VerifyReport:
    out = Path(out)
    hf_model, problems = load_exported(out)
    report = VerifyReport(loading_problems=problems)
    x = val_batch(run, batch_size, seed)
    with torch.no_grad():
        ours = run.model(x, all_logits=True).logits.float()
        theirs = hf_model(x).logits.float()
    report.logit_shape = tuple(x.shape)
    report.max_logit_diff = float((ours - theirs).abs().max())
    block_size = run.config.model.block_size
    prompt = min(PROMPT_TOKENS, block_size // 2)
    n = min(GREEDY_TOKENS, block_size - prompt)  # transformers' GPT-2 stops at its context
    expected, got = greedy(run.model, hf_model, x[:1, :prompt], n)
    report.greedy_tokens, report.greedy_same = n, expected == got
    report.tokenizer_tokens, report.tokenizer_same = tokenizer_matches(out, run)
    return report
