"""What every export mapping offers, and the choice of one for a model.

A mapping turns a moegpt model into one transformers architecture, exactly: its `config.json` and its
weights under that architecture's parameter names. It looks at the built model (module classes, shapes),
never at variant names. `choose_mapping` takes the mapping that accepts the model (at most one does); when
none does, the mapping that claims it (same trunk, attention and kind of router) names the reason and the
nearest configuration that does export.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.errors import MoegptError


class ExportRefused(MoegptError):
    """The model has no exact transformers counterpart; nothing is written (exit 2)."""


class SourceWeights:
    """A model's state_dict that remembers which entries a mapping consumed, so that a parameter the
    mapping does not know (one added to the model later) stops the export instead of being dropped."""

    def __init__(self, model: nn.Module, unused: tuple[str, ...] = ()) -> None:
        self.tensors = dict(model.state_dict())
        self.taken: set[str] = set(unused)

    def __getitem__(self, name: str) -> Tensor:
        self.taken.add(name)
        return self.tensors[name]

    def get(self, name: str) -> Tensor | None:
        return self[name] if name in self.tensors else None

    def finish(self, out: dict[str, Tensor], target: str) -> dict[str, Tensor]:
        """`out` as detached contiguous fp32 tensors, once every weight of the model has been placed."""
        left = sorted(set(self.tensors) - self.taken)
        if left:
            raise MoegptError(f"the {target} export does not place these weights: {', '.join(left[:5])}"
                              f"{' ...' if len(left) > 5 else ''}")
        return {name: t.detach().to(torch.float32).contiguous() for name, t in out.items()}


class Mapping:
    """One transformers architecture. Subclasses set the names and implement the four methods."""

    architecture = ""  # the transformers class written into config.json
    summary = ""  # the moegpt configurations it exports, for refusals

    def claims(self, model: nn.Module) -> bool:
        """Whether this mapping is the one to explain a refusal for this model (its trunk, attention, router)."""
        raise NotImplementedError

    def refusal(self, model: nn.Module) -> str | None:
        """None when the model maps exactly; else one sentence: why not, and the nearest exportable config."""
        raise NotImplementedError

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        raise NotImplementedError

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """Contiguous tensors under the target's names (tied weights once), every model weight placed."""
        raise NotImplementedError


def trunk(model: nn.Module) -> str:
    """The model's trunk: "gpt2" or "llama" (model.arch)."""
    return getattr(model.config, "arch", "gpt2")


def tied_head_unused(model: nn.Module) -> tuple[str, ...]:
    """A tied head's weight is the embedding's: transformers re-ties it, so it is written once."""
    return ("lm_head.weight",) if getattr(model.config, "tie_embeddings", True) else ()


MAPPINGS: list[Mapping] = []


def register(mapping_cls: type[Mapping]) -> type[Mapping]:
    MAPPINGS.append(mapping_cls())
    return mapping_cls


def choose_mapping(model: nn.Module) -> Mapping:
    """The mapping that exports `model` exactly, else ExportRefused with the claiming mapping's reason."""
    for mapping in MAPPINGS:
        if mapping.refusal(model) is None:
            return mapping
    for mapping in MAPPINGS:
        if mapping.claims(model):
            raise ExportRefused(f"cannot export: {mapping.refusal(model)}")
    exportable = "; ".join(m.summary for m in MAPPINGS)
    raise ExportRefused(f"cannot export: no transformers architecture matches this model; exportable: {exportable}")
