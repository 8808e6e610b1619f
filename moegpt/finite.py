"""Where a model's forward pass stops being finite: a checkpoint saved just before a divergence can
hold finite weights whose activations still overflow to inf/NaN."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moegpt.errors import NonFiniteOutput

if TYPE_CHECKING:
    from moegpt.model import GPT


def check_logits(logits_BV: Tensor, where: str) -> None:
    """Raise NonFiniteOutput when any logit is NaN or infinite (a softmax over them is meaningless)."""
    if logits_BV.device.type == "cpu":
        # the sum is finite exactly when every logit is: in float64 finite fp32/bf16 logits cannot overflow it,
        # and it costs two ops where an isfinite mask, its all() and a bool() cost three and more time (once
        # per generated token)
        finite = math.isfinite(logits_BV.sum(dtype=torch.float64).item())
    else:  # not every accelerator has float64 (MPS)
        finite = bool(torch.isfinite(logits_BV).all())
    if not finite:
        raise NonFiniteOutput(f"non-finite logits (NaN/inf) {where}")


@torch.no_grad()
def first_non_finite(model: GPT, idx_BT: Tensor) -> str:
    """'layer N (MoE)', 'layer N', 'the final norm' or 'the output logits': the first part of the forward
    pass on idx_BT whose output holds a NaN or inf ('nowhere' when the pass is finite)."""
    parts = [(f"layer {i}" + (" (MoE)" if i in model.moe_layers else ""), block)
             for i, block in enumerate(model.blocks)] + [("the final norm", model.ln_f),
                                                          ("the output logits", model.lm_head)]
    found: list[str] = []

    def hook(name: str):
        def record(module, inputs, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not found and not bool(torch.isfinite(out).all()):
                found.append(name)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in parts]
    was_training = model.training
    try:
        model.eval()
        model(idx_BT, all_logits=True)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found[0] if found else "nowhere"


def _named(checkpoint: object, step: object) -> str:
    return f"{checkpoint} (saved at training step {step})"


@contextlib.contextmanager
def naming_checkpoint(checkpoint: object, step: object) -> Iterator[None]:
    """Inside: a NonFiniteOutput names the checkpoint and its training step."""
    try:
        yield
    except NonFiniteOutput as err:
        raise NonFiniteOutput(f"{_named(checkpoint, step)} produced {err}; its weights are finite but "
                              "overflow: use an earlier checkpoint") from None


def check_evaluation(ce: float, model: GPT, ids: Sequence[int], checkpoint: object, step: object) -> None:
    """After an evaluation whose cross-entropy is NaN/inf: say which layer first went non-finite."""
    if math.isfinite(ce):
        return
    window_1T = torch.as_tensor(list(ids[:model.config.block_size]), dtype=torch.long).unsqueeze(0)
    device = next(model.parameters()).device
    raise NonFiniteOutput(f"{_named(checkpoint, step)} produced a non-finite cross-entropy ({ce}); on the first "
                          f"window the forward pass first went non-finite at "
                          f"{first_non_finite(model, window_1T.to(device))}: use an earlier checkpoint")
