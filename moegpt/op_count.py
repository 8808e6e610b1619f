"""Counting the aten operators a piece of code dispatches: the op count of a decode step, which bounds its
per-token overhead on a CPU (at generation's one-token width each op costs its dispatch, not its FLOPs)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from moegpt.model import GPT


class OpCounter(TorchDispatchMode):
    """Within `with OpCounter() as ops:`, `ops.counts` maps each aten overload name to its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """The aten ops fn() dispatches, by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


def decode_ops_per_token(model: GPT, prompt_ids: Tensor | Sequence[int], new_tokens: int = 8,
                         **sampling: Any) -> Counter[str]:
    """Aten ops of one KV-cached decode step (the forward of one token and the sampling of the next), by
    name: generating 1 + new_tokens tokens minus generating 1 (the prompt pass and its sample), divided by
    new_tokens, after one uncounted warm-up generation. prompt + new_tokens + 1 must fit the block, so that no
    window slide is counted."""
    from moegpt.errors import MoegptError
    from moegpt.generate import _as_batch, generate

    prompt_len = _as_batch(prompt_ids, "cpu").shape[1]
    if new_tokens < 1 or prompt_len + new_tokens + 1 > model.config.block_size:
        raise MoegptError(f"prompt ({prompt_len}) + new_tokens ({new_tokens}) + 1 must fit block_size "
                          f"{model.config.block_size}, and new_tokens >= 1")
    sampling = {"temperature": 0.0, **sampling}
    generate(model, prompt_ids, 1 + new_tokens, use_cache=True, **sampling)  # per-model caches made once, uncounted
    prefill = count_ops(lambda: generate(model, prompt_ids, 1, use_cache=True, **sampling))
    full = count_ops(lambda: generate(model, prompt_ids, 1 + new_tokens, use_cache=True, **sampling))
    full.subtract(prefill)
    return Counter({name: n // new_tokens for name, n in full.items() if n > 0})
