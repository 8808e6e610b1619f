"""`moegpt prepare`: turn a text source into data/<name>/ (tokenizer, train.bin, val.bin, meta.json)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from moegpt.cli.app import app
from moegpt.errors import MoegptError
from moegpt.prepare import (
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
    STAGES,
    PrepareResult,
    prepare_dataset,
)
from moegpt.safe_io import write_failures_as_errors

SIZE_SUFFIXES = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'12000000', '12M', '500k', '2MiB' -> bytes (k/M/G decimal, KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in SIZE_SUFFIXES:
        raise MoegptError(f"--max-bytes expects a size such as 8000000, 8M, 500k or 2MiB (got {text!r})")
    return int(float(match.group(1)) * SIZE_SUFFIXES[match.group(2)])


BYTE_STAGES = ("read", "encode")  # the others (tokenizer training, writing) have no byte count to show


class ByteStageColumn(ProgressColumn):
    """Shows the wrapped column only for stages measured in bytes."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__()
        self.inner = inner

    def render(self, task: Task) -> Any:
        return self.inner.render(task) if task.fields.get("stage") in BYTE_STAGES else Text("")


class RichProgress:
    """The library's progress(stage, done, total) callback drawn as one rich bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            for task in self.tasks.values():  # a new stage means the earlier ones are complete
                finished = self.progress.tasks[task].completed
                self.progress.update(task, total=finished or 1, completed=finished or 1)
            self.tasks[stage] = self.progress.add_task(STAGES.get(stage, stage), total=total, stage=stage)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def render_summary(result: PrepareResult, console: Console) -> None:
    meta = result.meta
    splits = meta["splits"]
    # one source document is cut in two at a line end: each split holds a part of it, not a document
    one_cut = not meta.get("split", {}).get("unit", "document").startswith("document")
    table = Table(title=f"prepared {result.path}", title_justify="left",
                  caption="one document, cut at a line end into train and val" if one_cut
                  else "whole documents per split (seeded shuffle)", caption_justify="left")
    for column in ("split", "documents", "bytes", "tokens", "bytes/token"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in splits.items():
        table.add_row(split, "part of 1" if one_cut else f"{info['documents']:,}", human_bytes(info["bytes"]),
                      f"{info['tokens']:,}", f"{info['bytes_per_token']:.2f}")
    eots, n_bytes, tokens = (sum(info[key] for info in splits.values())
                             for key in ("documents", "bytes", "tokens"))
    source_docs = meta["source"].get("documents", 1 if one_cut else eots)
    table.add_row("total", f"{source_docs:,}", human_bytes(n_bytes), f"{tokens:,}",
                  f"{n_bytes / max(1, tokens - eots):.2f}", style="bold")
    console.print(table)

    source, tok = meta["source"], meta["tokenizer"]
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("source", source.get("description", source["spec"]))
    facts.add_row("fingerprint", f"sha256 {source['sha256'][:16]}…" + (" (cut at --max-bytes)"
                                                                        if source.get("truncated") else ""))
    if source.get("replaced_bytes"):
        facts.add_row("replaced", f"{source['replaced_bytes']:,} invalid byte(s) replaced by U+FFFD")
    vocab_note = ""
    if tok.get("requested_vocab_size") not in (None, tok["vocab_size"]):
        vocab_note = f" (asked {tok['requested_vocab_size']}; the corpus ran out of merges)"
    facts.add_row("tokenizer",
                  f"{tok['kind']}, vocab {tok['vocab_size']:,}{vocab_note}, bins {meta['dtype']}")
    stages = ", ".join(f"{STAGES.get(k, k)} {v:.1f}s" for k, v in result.stage_seconds.items())
    facts.add_row("time", f"{result.seconds:.1f} s ({stages})")
    console.print(facts)


@app.command("prepare")
def prepare_command(
    source: Annotated[str, typer.Option("--source", "-s", help=(
        "stdlib (this Python's standard library, offline), a local file/folder/glob of "
        ".txt .md .py .json .jsonl .parquet, or hf:owner/name[:config]."))] = "stdlib",
    name: Annotated[str | None, typer.Option("--name", help=(
        "Folder name under the data root; default from the source (stdlib, file stem, dataset name), "
        "with -char/-gpt2 appended for those tokenizers."))] = None,
    data_root: Annotated[str, typer.Option("--data-root", help="Where prepared folders live.")] = "data",
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help=(
        "bpe (byte-level, trained on the train split), char, or gpt2 (tiktoken's; needs its cached files)."))
    ] = "bpe",
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help=(
        f"BPE vocabulary including 1 special token (default {DEFAULT_VOCAB_SIZE}; >= 257). "
        "Bins are uint16 up to 65536 tokens, uint32 above."))] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help=(
        "Share of documents held out for validation (a single document is cut at a line end)."))
    ] = DEFAULT_VAL_FRACTION,
    max_bytes: Annotated[str | None, typer.Option("--max-bytes", help=(
        "Cap on the corpus text, e.g. 4M (default 16M for stdlib, no cap otherwise)."))] = None,
    text_field: Annotated[str | None, typer.Option("--text-field", help=(
        "Field holding the text in .json/.jsonl/.parquet files and hub datasets (hub default: text)."))
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Hub dataset split to read.")] = "train",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the document shuffle that picks val.")
                    ] = DEFAULT_SEED,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing data/<name>.")] = False,
    encoding_errors: Annotated[str, typer.Option("--encoding-errors", help=(
        "strict: refuse non-UTF-8 or binary files (naming file and offset); replace: use U+FFFD and count."))
    ] = "strict",
) -> None:
    """Prepare a corpus: read text, split train/val by document, build a tokenizer, write token bins."""
    if vocab_size is not None and tokenizer != "bpe":
        raise MoegptError(f"--vocab-size applies to the bpe tokenizer only (the {tokenizer} vocabulary "
                          "is fixed by its data)")
    cap = parse_size(max_bytes) if max_bytes is not None else None
    console = Console(stderr=True)
    columns = (SpinnerColumn(finished_text="✓"), TextColumn("{task.description:<18}"), BarColumn(),
               ByteStageColumn(DownloadColumn()), ByteStageColumn(TransferSpeedColumn()), TimeElapsedColumn())
    # Bars only on a terminal: redirected output (scripts, CI) gets the summary and nothing else.
    with (write_failures_as_errors(f"cannot prepare data under {data_root}", "nothing was installed or replaced"),
          Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bars):
        result = prepare_dataset(source=source, name=name, data_root=data_root, tokenizer=tokenizer,
                                 vocab_size=DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size,
                                 val_fraction=val_fraction,
                                 max_bytes=cap, text_field=text_field, split=split, seed=seed, force=force,
                                 encoding_errors=encoding_errors, progress=RichProgress(bars))
    render_summary(result, Console())
    root = "" if result.path.parent == Path("data") else f" --data-root {result.path.parent}"
    print(f"next: moegpt train --data {result.path.name}{root}")
