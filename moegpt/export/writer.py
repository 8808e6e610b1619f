"""Write a run as a Hugging Face model folder, all or nothing.

The folder is built as `.<name>.tmp-<pid>` beside OUT (optionally checked there) and renamed to OUT only
when complete, so a refusal, an error or an interrupt leaves no OUT, and a replaced export (`force`) stays
whole until its successor is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moegpt.errors import MoegptError
from moegpt.export.card import generation_config, model_card
from moegpt.export.hf_tokenizer import tokenizer_files
from moegpt.export.mapping import Mapping, choose_mapping
from moegpt.runs import LoadedRun

WEIGHTS_FILE = "model.safetensors"
# Files every export holds; a folder with these is a previous export that `force` may replace.
EXPORT_MARKERS = ("config.json", WEIGHTS_FILE)


class ExportExists(MoegptError):
    """The destination holds a previous export and replacing it was not asked for."""


@dataclass
class ExportResult:
    out: Path
    architecture: str
    files: list[str]
    weights_bytes: int


def check_destination(out: Path, force: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise MoegptError(f"{out} exists and is not a folder")
    if not all((out / name).is_file() for name in EXPORT_MARKERS):
        raise MoegptError(f"{out} is a non-empty folder that holds no export; choose a new folder")
    if not force:
        raise ExportExists(f"{out} already holds an export; choose a new folder or replace it")


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_folder(folder: Path, run: LoadedRun, mapping: Mapping, out_name: str) -> list[str]:
    from safetensors.torch import save_file

    tok = run.tokenizer()
    if tok.vocab_size != run.config.model.vocab_size:
        raise MoegptError(f"the run's tokenizer has {tok.vocab_size} tokens but its model "
                          f"{run.config.model.vocab_size}")
    save_file(mapping.hf_weights(run.model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(folder / "config.json", mapping.hf_config(run.model, tok.eot_id))
    write_json(folder / "generation_config.json", generation_config(tok.eot_id, run.config.model.block_size))
    for name, content in tokenizer_files(tok, run.config.model.block_size).items():
        write_json(folder / name, content)
    write_json(folder / "moegpt_config.json", run.config.to_dict())
    (folder / "README.md").write_text(model_card(run, tok, mapping.architecture, out_name), encoding="utf-8")
    return sorted(p.name for p in folder.iterdir())


def export_run(run: LoadedRun, out: str | Path, force: bool = False,
               check: Callable[[Path], None] | None = None) -> ExportResult:
    """Export `run` to the folder `out`; `check(folder)` (which raises to refuse) runs before the rename."""
    out = Path(out)
    check_destination(out, force)
    mapping = choose_mapping(run.model)  # refuses before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = write_folder(tmp, run, mapping, out.name)
        if check is not None:
            check(tmp)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, mapping.architecture, files, (out / WEIGHTS_FILE).stat().st_size)


def replace_folder(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
