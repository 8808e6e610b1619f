"""`moegpt export`: a run as a Hugging Face transformers model folder, optionally verified in transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moegpt.cli.app import app
from moegpt.errors import MoegptError

FORMATS = ("hf",)


class ExportCheckFailed(MoegptError):
    """The exported model does not reproduce the run (a bug, not bad input): exit 1, nothing written."""

    exit_code = 1


@app.command("export")
def export_command(
    run: Annotated[str, typer.Argument(metavar="RUN_OR_CHECKPOINT", show_default=False,
                                       help="Run folder (uses ckpt/best.pt, else the latest checkpoint) or a "
                                            "checkpoint file.")],
    out: Annotated[str, typer.Argument(metavar="OUT", show_default=False,
                                       help="Folder to create (must not exist, or be empty).")],
    format_: Annotated[str, typer.Option("--format", help="Output format: hf (a transformers model folder).")] = "hf",
    check: Annotated[bool, typer.Option(
        "--check", help="Before OUT is created, load the export in transformers (needs the hf extra) and compare "
                        "logits, greedy generation and tokenization with moegpt's on the run's val split.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds a previous export.")] = False,
) -> None:
    """Write a trained run as a transformers model: config.json, model.safetensors, tokenizer, model card.

    Exact mappings only (anything else exits 2, naming the nearest exportable configuration):

    gpt2 trunk, dense GELU or ReLU FFN: GPT2LMHeadModel

    llama trunk, dense SwiGLU FFN: LlamaForCausalLM

    llama trunk, topk: MixtralForCausalLM

    llama trunk, shared with moe.shared_gate: Qwen2MoeForCausalLM

    llama trunk with MLA, aux-free or dense: DeepseekV3ForCausalLM

    llama trunk with MLA, shared or topk with moe.normalize_topk=false: DeepseekV2ForCausalLM

    Load it with AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT).
    """
    from moegpt.export import export_run  # here, not at import: `--help` must not wait for torch
    from moegpt.export.writer import ExportExists
    from moegpt.runs import load_run

    if format_ not in FORMATS:
        raise MoegptError(f"--format: unknown format {format_!r}; valid: {', '.join(FORMATS)}")
    loaded = load_run(run, "cpu")
    checker, reports = None, []
    if check:
        from moegpt.export.verify import import_transformers, verify_export

        import_transformers()  # fail before writing anything when the extra is missing

        def checker(folder: Path) -> None:
            report = verify_export(folder, loaded)
            reports.append(report)
            if not report.passed:
                raise ExportCheckFailed(f"check failed, nothing written: {report.summary()}")

    try:
        result = export_run(loaded, out, force=force, check=checker)
    except ExportExists as err:
        raise MoegptError(f"{err} (--force)") from None
    size = result.weights_bytes / 1e6
    typer.echo(f"exported {loaded.checkpoint} (step {loaded.state.get('step', '?')}) as {result.architecture} "
               f"to {result.out}: {', '.join(result.files)} ({size:.1f} MB of weights)")
    for report in reports:
        typer.echo(f"check passed: {report.summary()}")
