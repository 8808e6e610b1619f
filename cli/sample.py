"""`moegpt sample`: generate text from a run, streamed, optionally coloured by each token's top-1 expert."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from moegpt.cli import options as opt
from moegpt.cli.app import OPTIONAL_VALUE_OPTIONS, app
from moegpt.cli.palette import NO_EXPERT_STYLE, token_style
from moegpt.config import precision_problem
from moegpt.errors import MoegptError, WriteFailed

if TYPE_CHECKING:  # torch and the model load inside the command: `--help` must not wait for them

    from moegpt.generate import LayerRouting
    from moegpt.runs import LoadedRun
    from moegpt.tokenizer import Tokenizer

# `--show-routing` alone means the last MoE layer (see RunArg below for `--show-routing RUN`).
OPTIONAL_VALUE_OPTIONS.setdefault("--show-routing", "last")

SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--sample-top-k", "top_p": "--top-p",
                  "max_new_tokens": "--max-new-tokens"}

RunArg = Annotated[str | None, typer.Argument(
    metavar="RUN_OR_CHECKPOINT", show_default=False,
    help="Run folder (uses ckpt/best.pt, else the latest checkpoint) or a checkpoint file.")]


def colour_console(stderr: bool, force: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    forced = force and not stream.isatty()
    return Console(stderr=stderr, highlight=False, soft_wrap=True, force_terminal=True if forced else None,
                   color_system="256" if forced else "auto")


def is_layer_spec(value: str) -> bool:
    return value == "last" or value.isdigit()


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Prompt ids; a char vocabulary refuses characters it lacks (they would silently become UNK)."""
    if tok.kind == "char":
        known = set(getattr(tok, "chars", []))
        missing = sorted({c for c in text if c not in known})
        if missing:
            names = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise MoegptError(f"the prompt has {len(missing)} character(s) outside this run's char vocabulary: "
                              f"{names}")
    return tok.encode(text)


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise MoegptError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return prompt or ""
    path = Path(prompt_file)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoegptError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MoegptError(f"cannot read prompt file {path}: {err}") from None


def resolve_layer(spec: str, moe_layers: list[int], n_layer: int) -> int:
    if not moe_layers:
        raise MoegptError("--show-routing: this model has no MoE layers (dense variant)")
    if spec == "last":
        return moe_layers[-1]
    layer = int(spec)
    if layer not in moe_layers:
        raise MoegptError(f"--show-routing {layer}: not a MoE layer of this {n_layer}-layer model; "
                          f"MoE layers: {', '.join(map(str, moe_layers))}")
    return layer


class SampleWriter:
    """Writes one sample's tokens to stdout as text arrives; colours by expert when routing is shown."""

    def __init__(self, console: Console | None, tok: Tokenizer, layer: int | None, stream: bool,
                 show_prompt: bool) -> None:
        self.console, self.layer, self.stream, self.show_prompt = console, layer, stream, show_prompt
        from moegpt.generate import Utf8StreamDecoder

        self.decoder = Utf8StreamDecoder(tok)
        self.pieces: list[tuple[str, str]] = []  # (text, style) held until the end when not streaming

    def add(self, ids: list[int], routing: list[LayerRouting | None] | None, prompt: bool) -> None:
        top1 = [-1] * len(ids)
        if routing is not None and self.layer is not None and routing[self.layer] is not None:
            top1 = routing[self.layer].top1_BT()[0].tolist()
        for token, expert in zip(ids, top1, strict=True):
            text = self.decoder.feed([token])
            if prompt and not self.show_prompt:
                continue
            style = token_style(expert, prompt) if self.layer is not None else ("bold" if prompt else "")
            self.emit(text, style)

    def emit(self, text: str, style: str) -> None:
        if not text:
            return
        if not self.stream:
            self.pieces.append((text, style))
        elif self.console is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            self.console.print(Text(text, style=style), end="")

    def finish(self) -> None:
        self.emit(self.decoder.flush(), "")
        self.stream = True
        for text, style in self.pieces:
            self.emit(text, style)
        self.emit("\n", "")


def routing_record(tok: Tokenizer, ids: list[int], routing: list[LayerRouting | None], prompt_len: int,
                   moe_layers: list[int]) -> dict[str, Any]:
    """One sample for --routing-json: per token, per MoE layer, the chosen experts and their weights."""
    tokens = []
    lists = {layer: (r.expert_idx_BTK[0].tolist(), r.expert_weight_BTK[0].float().tolist(),
                     None if r.dropped_BTK is None else r.dropped_BTK[0].tolist())
             for layer in moe_layers if (r := routing[layer]) is not None}
    for pos, token in enumerate(ids):
        layers = []
        for layer, (idx, weight, dropped) in lists.items():
            keep = [j for j, e in enumerate(idx[pos]) if e >= 0]
            entry: dict[str, Any] = {"layer": layer, "experts": [idx[pos][j] for j in keep],
                                     "weights": [round(weight[pos][j], 6) for j in keep]}
            if dropped is not None:
                entry["dropped"] = [bool(dropped[pos][j]) for j in keep]
            layers.append(entry)
        tokens.append({"position": pos, "id": token, "prompt": pos < prompt_len,
                       "text": tok.decode_bytes([token]).decode("utf-8", errors="replace"), "routing": layers})
    return {"prompt_tokens": prompt_len, "tokens": tokens}


def check_options(run: str | None, show_routing: str | None, sampling: dict[str, str], num_samples: int,
                  precision: str, routing_json: str | None) -> None:
    """Every check that needs no model, so a bad flag fails before anything loads."""
    if run is None:
        raise MoegptError("missing argument RUN_OR_CHECKPOINT (a run folder or a checkpoint file)")
    if show_routing is not None and not is_layer_spec(show_routing):
        raise MoegptError(f"--show-routing takes a layer number or 'last' (got {show_routing!r})")
    problems = [f"{SAMPLING_FLAGS[name]} {what}" for name, what in sampling.items()]
    if num_samples < 1:
        problems.append(f"--num-samples must be >= 1 (got {num_samples})")
    if problems:
        raise MoegptError("; ".join(problems))
    if problem := precision_problem(precision, "--precision"):
        raise MoegptError(problem)
    if routing_json is not None and not Path(routing_json).resolve().parent.is_dir():
        raise MoegptError(f"--routing-json {routing_json}: its folder does not exist")


def print_legend(layer: int, n_expert: int) -> None:
    legend = Text(f"routing: top-1 expert per token at layer {layer} (underlined: prompt): ")
    for e in range(n_expert):
        legend.append(f" {e} ", style=token_style(e)).append(" ")
    legend.append(" none ", style=NO_EXPERT_STYLE)
    colour_console(stderr=True, force=True).print(legend)


@app.command("sample")
def sample_command(
    run: RunArg = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text to continue (default: start a new "
                                                                "document).")] = None,
    prompt_file: Annotated[str | None, typer.Option("--prompt-file", metavar="FILE",
                                                    help="Read the prompt from a UTF-8 file.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate per sample.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--sample-top-k", help="Sample among the k most likely tokens; 0 = off. "
                                       "(In `train`, --top-k is experts per token.)")] = 200,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: smallest set of tokens with this "
                                                         "much probability, in (0, 1]; 1 = off.")] = 1.0,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Independent samples to draw.")] = 1,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default: a fresh one, printed at "
                                                            "the end); same seed, same text on CPU.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are produced.")] = True,
    show_routing: Annotated[str | None, typer.Option(
        "--show-routing", metavar="[LAYER]",
        help="Colour each token by its top-1 expert at LAYER (default: the last MoE layer); legend on stderr.")] = None,
    routing_json: Annotated[str | None, typer.Option(
        "--routing-json", metavar="FILE",
        help="Write per token, per MoE layer, the chosen experts and weights (JSON).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="KV cache (causal variants; non-causal ones "
                                                                   "always recompute).")] = True,
    context_keep: Annotated[int | None, typer.Option(
        "--context-keep", help="Past block_size the window slides, keeping this many newest tokens and "
                               "recomputing the cache on them (default block_size/2; block_size = nanoGPT's "
                               "crop, slower).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda[:N], mps.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32 or bf16 (autocast).")] = "auto",
    threads: opt.Threads = "auto",
) -> None:
    """Generate text from a trained run: samples on stdout, warnings, legend and tokens/s on stderr.

    The prompt is processed in one pass, then one token per step with a per-layer KV cache. The
    model sees at most block_size tokens: a longer prompt is refused; generation past block_size
    slides the window to its newest --context-keep tokens (learned positions: the cache is recomputed
    on them). expert-choice and soft are not causal and recompute the window every step.
    Capacity-limited variants (switch) route one token per cached step, so none is dropped there.
    """
    import torch

    from moegpt.finite import naming_checkpoint
    from moegpt.generate import concat_routing, generate_steps, model_is_causal, sampling_problems
    from moegpt.runs import load_run
    from moegpt.runtime import autocast, resolve_device, resolve_precision
    from moegpt.threads import apply_threads

    if show_routing is not None and not is_layer_spec(show_routing) and run is None:
        run, show_routing = show_routing, "last"  # `--show-routing RUN`: the bare flag, then the run
    check_options(run, show_routing, sampling_problems(temperature, top_k, top_p, max_new_tokens), num_samples,
                  precision, routing_json)
    text = read_prompt(prompt, prompt_file)
    if temperature == 0 and num_samples > 1:
        print(f"note: --temperature 0 is greedy decoding: the {num_samples} samples will be identical",
              file=sys.stderr)

    n_threads = apply_threads(threads)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    loaded = load_run(run, dev)
    model, tok = loaded.model, loaded.tokenizer()
    block = model.config.block_size
    if context_keep is not None and not 1 <= context_keep <= block:
        raise MoegptError(f"--context-keep must be in [1, block_size={block}] (got {context_keep})")
    prompt_ids = encode_prompt(tok, text) if text else [tok.eot_id]  # no prompt: a new document begins
    if len(prompt_ids) > block:
        raise MoegptError(f"the prompt is {len(prompt_ids)} tokens but this model sees at most {block} "
                          "(block_size); shorten it (generation itself may run past block_size)")
    layer = None if show_routing is None else resolve_layer(show_routing, model.moe_layers, len(model.blocks))

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    use_cache = cache and model_is_causal(model)
    if cache and not use_cache:
        err.print(f"warning: {model.moe_config.variant} is not causal: no KV cache, the whole window is "
                  "recomputed for every token", markup=False)
    # colours on a terminal, and always for --show-routing (the colours are the point; `less -R` shows them)
    out = colour_console(stderr=False, force=layer is not None) if layer is not None or sys.stdout.isatty() else None
    if layer is not None:
        print_legend(layer, model.moe_config.n_expert)

    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    generator = torch.Generator(device=dev).manual_seed(seed)
    capture = layer is not None or routing_json is not None
    samples, generated, seconds = [], 0, 0.0
    for i in range(num_samples):
        if i:
            (out.print if out else print)("---------------")
        writer = SampleWriter(out, tok, layer, stream, show_prompt=bool(text))
        ids, parts, t0 = [], [], time.perf_counter()
        with autocast(dev, prec), naming_checkpoint(loaded.checkpoint, loaded.state.get("step")):
            for step in generate_steps(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator,
                                       use_cache, context_keep, capture_routing=capture):
                step_ids = step.tokens_BT[0].tolist()
                writer.add(step_ids, step.routing, step.is_prompt)
                ids += step_ids
                parts.append(step.routing)
        seconds += time.perf_counter() - t0
        generated += len(ids) - len(prompt_ids)
        writer.finish()
        if routing_json is not None:
            samples.append(routing_record(tok, ids, concat_routing(parts), len(prompt_ids), model.moe_layers))

    if routing_json is not None:
        write_routing_json(Path(routing_json), loaded, use_cache, seed, samples)
    rate = generated / seconds if seconds > 0 else math.inf
    err.print(f"{generated} tokens in {seconds:.2f} s: {rate:,.1f} tokens/s "
              f"({'KV cache' if use_cache else 'full recompute'}, {dev.type}, {prec}, {n_threads} threads, "
              f"seed {seed})", markup=False)


def write_routing_json(path: Path, loaded: LoadedRun, use_cache: bool, seed: int, samples: list[dict]) -> None:
    model = loaded.model
    doc = {"checkpoint": str(loaded.checkpoint), "variant": model.moe_config.variant,
           "n_expert": model.moe_config.n_expert, "n_layer": len(model.blocks), "moe_layers": model.moe_layers,
           "kv_cache": use_cache, "seed": seed, "samples": samples}
    try:
        path.write_text(json.dumps(doc) + "\n")
    except OSError as err:
        raise WriteFailed(f"cannot write --routing-json {path}: {err.strerror or err}") from None
