"""Counting the aten operators a piece of code dispatches: the op count per generated token, which bounds
generation's per-token overhead on a CPU (at one token per step each op costs its dispatch, not its FLOPs)."""

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


def decode_ops_per_token(model: GPT, prompt_ids: Tensor | Sequence[int], context_keep: int | None = None,
                         **sampling: Any) -> Counter[str]:
    """Aten ops per generated token of KV-cached generation once it runs steady, by name (amortised, so
    fractional).

    Steady generation repeats one cycle: the window slides, one pass refills the cache with the kept tokens
    (and samples a token), then one decode step per token (a one-token forward and the sampling of the next)
    until the window is full again. The count covers exactly one cycle, the first after the prompt's window
    first slid: the ops of generating through its end minus those of generating up to its start, over its
    tokens. So the refilling pass, and whatever a cache fill sets up for its decode steps to reuse (buffers,
    views), are charged to the tokens they serve. One uncounted generation first makes the per-model caches
    (weights laid out for decode steps), as any earlier generation would have.
    """
    from moegpt.errors import MoegptError
    from moegpt.generate import _as_batch, context_keep_for, generate, slide_steps

    block = model.config.block_size
    keep, problem = context_keep_for(block, context_keep)
    if problem:
        raise MoegptError(problem)
    slides = slide_steps(_as_batch(prompt_ids, "cpu").shape[1], block, keep)
    first, end = next(slides), next(slides)
    sampling = {"temperature": 0.0, **sampling}

    def run(steps: int) -> None:
        generate(model, prompt_ids, steps, use_cache=True, context_keep=keep, **sampling)

    run(end)  # per-model caches made once, uncounted
    before = count_ops(lambda: run(first))
    cycle = count_ops(lambda: run(end))
    cycle.subtract(before)
    return Counter({name: round(n / (end - first), 2) for name, n in cycle.items() if n > 0})
