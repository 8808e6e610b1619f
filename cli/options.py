"""Option types shared by the commands that build a model (params, train, bench)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from moegpt.config import ACTIVATIONS, DISPATCH_BACKENDS

# The variants come from the registry, which imports torch: `--help` names where to find them instead
# (`moegpt variants`), so that it answers without loading torch and a new variant needs no edit here.
VARIANT_HELP = ("Routing variant of the MoE layers, e.g. topk, switch, shared, aux-free; `moegpt variants` lists "
                "every one. dense is one FFN per layer (width 4 x n-embd) with --activation: SwiGLU by default; "
                "--moe dense --activation gelu is nanoGPT's MLP (without biases).")

Preset = Annotated[str, typer.Option("--preset", help="Starting configuration: cpu (default), "
                                                      "deepseek, tiny, gpu-small.")]
ConfigFile = Annotated[str | None, typer.Option("--config", "-c", help="TOML config file (e.g. runs/NAME/config.toml); "
                                                  "overrides the preset, flags override it.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: section.key=value "
                                                  "(repeatable), e.g. --set moe.capacity_factor=1.0.")]
Moe = Annotated[str | None, typer.Option("--moe", help=VARIANT_HELP)]
NExpert = Annotated[int | None, typer.Option("--n-expert", help="Routed experts per MoE layer.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Routed experts per token (switch always uses 1, basic "
                                                           "all; expert-choice: average per token).")]
ExpertHidden = Annotated[int | None, typer.Option(
    "--expert-hidden", help="Hidden width of one expert (0 = equal active params with dense).")]
Activation = Annotated[str | None, typer.Option(
    "--activation", help="Activation of every FFN: the experts, the shared experts and the dense FFN (of --moe "
                         "dense and of dense layers between MoE ones): " + ", ".join(ACTIVATIONS)
                         + " (swiglu by default; gelu is nanoGPT's).")]
CapacityFactor = Annotated[float | None, typer.Option(
    "--capacity-factor", help="Expert capacity factor: 0 = dropless, > 0 = at most ceil(cf*N*k/E) assignments "
    "per expert, < 0 = the variant's default (switch 1.25, expert-choice 1.0, others dropless).")]
Dispatch = Annotated[str | None, typer.Option("--dispatch", help="Dispatch backend: " + ", ".join(DISPATCH_BACKENDS)
                                                                 + " (sorted is the default).")]
NLayer = Annotated[int | None, typer.Option("--n-layer", help="Transformer blocks.")]
NHead = Annotated[int | None, typer.Option("--n-head", help="Attention heads.")]
NEmbd = Annotated[int | None, typer.Option("--n-embd", help="Model width.")]
BlockSize = Annotated[int | None, typer.Option("--block-size", help="Context length in tokens.")]
Threads = Annotated[str, typer.Option(
    "--threads", metavar="N|auto",
    help="Intra-op CPU threads. auto: OMP_NUM_THREADS when set, else every core this process may use; OpenMP "
         "threads spin briefly, then sleep, while they wait (unless OMP_WAIT_POLICY, GOMP_SPINCOUNT or "
         "KMP_BLOCKTIME is set), so a busy core "
         "elsewhere does not stall them.")]
VocabSize = Annotated[int | None, typer.Option(
    "--vocab-size", help="Vocabulary size (taken from the data when training).")]


def model_flags(moe: str | None = None, n_expert: int | None = None, top_k: int | None = None,
                expert_hidden: int | None = None, activation: str | None = None,
                capacity_factor: float | None = None, dispatch: str | None = None, n_layer: int | None = None,
                n_head: int | None = None, n_embd: int | None = None, block_size: int | None = None,
                vocab_size: int | None = None) -> dict[str, Any]:
    """Map the model-building flags to dotted config keys (None = not passed)."""
    return {
        "moe.variant": moe, "moe.n_expert": n_expert, "moe.top_k": top_k, "moe.expert_hidden": expert_hidden,
        "moe.activation": activation, "moe.capacity_factor": capacity_factor, "moe.dispatch": dispatch,
        "model.n_layer": n_layer, "model.n_head": n_head, "model.n_embd": n_embd,
        "model.block_size": block_size, "model.vocab_size": vocab_size,
    }
