"""Read training runs cheaply, for comparing them: config, metrics records, parameter counts, data identity.

Nothing here writes into a run. metrics.jsonl is read up to its last complete line, so a run that is
still training (and may be half-way through writing a record) reads as the records it has finished.
Parameter counts come from the config alone (the model is built on the meta device: no memory, no
initialisation); the data identity comes from the newest checkpoint's metadata (see checkpoint_peek)
and the data folder's meta.json, never from loading weights.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moegpt.checkpoint import resolve_checkpoint
from moegpt.checkpoint_peek import peek_checkpoint
from moegpt.config import RunConfig
from moegpt.errors import MoegptError
from moegpt.model import GPT
from moegpt.safe_io import read_step_records

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
GLOB_CHARS = set("*?[")


class NotARunError(MoegptError):
    """A folder that cannot be compared as a run (the message says why)."""


@dataclass(frozen=True)
class DataIdentity:
    """What a run's val CE was measured on: two runs are comparable only when their keys are equal."""

    name: str
    source_sha256: str | None  # of the prepared source text, from the checkpoint's data reference
    tokenizer: str | None  # "kind:sha256-prefix" from the data folder's meta.json, None when unreadable
    vocab_size: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.source_sha256 or f"name:{self.name}", self.tokenizer or "?", self.vocab_size)

    def describe(self) -> str:
        source = self.source_sha256[:8] if self.source_sha256 else "source unknown"
        tokenizer = self.tokenizer.split(":")[0] if self.tokenizer else "tokenizer unknown"
        return f"{self.name} ({tokenizer}, vocab {self.vocab_size}, {source})"


@dataclass
class RunRecord:
    """One run as read from disk: its config, parameter counts, data identity and metrics records."""

    path: Path
    config: RunConfig
    params: dict[str, int]
    data: DataIdentity
    logs: list[dict[str, Any]] = field(default_factory=list)  # training log records, step order
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation records, step order
    skipped_lines: int = 0  # complete lines that were not metrics records
    torn_tail: bool = False  # the file ended inside a record (still being written, or killed)
    label: str = ""  # how to name it when listed with others: the folder name, or its path if that repeats

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def has_train_s(self) -> bool:
        """Every record carries train_s (runs from before moegpt recorded it, or resumed across that
        change, have records without it and no usable time axis)."""
        records = self.logs + self.evals
        return bool(records) and all("train_s" in r for r in records)

    @property
    def last(self) -> dict[str, Any]:
        """The record with the highest step (evaluation records win ties: they carry val CE)."""
        return max(self.logs + self.evals, key=lambda r: (r["step"], "val_ce" in r))


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, bool]:
    """(log records, eval records, skipped complete lines, torn tail) of one metrics.jsonl."""
    records, skipped, torn = read_step_records(path)
    logs: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for record in records:
        if "val_ce" in record:
            evals.append(record)
        elif "loss_ce" in record:
            logs.append(record)
        else:
            skipped += 1
    logs.sort(key=lambda r: r["step"])
    evals.sort(key=lambda r: r["step"])
    return logs, evals, skipped, torn


# Weight initialisers (torch.nn.init functions and the Tensor methods they call): they only fill values
INITIALISERS = {"normal_", "uniform_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                "sparse_", "fill_", "zero_", "random_", "exponential_", "bernoulli_"}


class _SkipInitialisers(TorchFunctionMode):
    """Makes weight initialisers no-ops on meta tensors: there are no values to fill, and torch runs an
    initialiser on a meta tensor through torch._refs, whose first use imports torch._dynamo (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in INITIALISERS:
            target = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if target is not None and target.is_meta:
                return target
        return func(*args, **kwargs)


def params_from_config(cfg: RunConfig) -> dict[str, int]:
    """GPT.num_params() of the config's model, built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"), _SkipInitialisers():
        model = GPT(cfg.model, cfg.moe)
    return model.num_params()


def data_identity(run_dir: Path, cfg: RunConfig) -> DataIdentity:
    """From the newest checkpoint's data reference (without loading it) and the data folder's meta.json;
    before the first checkpoint, from the config's data folder."""
    try:
        ref = peek_checkpoint(resolve_checkpoint(run_dir), keys=("data_ref",)).get("data_ref")
    except MoegptError:
        ref = None
    ref = ref if isinstance(ref, dict) else {}
    data_dir = Path(ref.get("data_dir") or Path(cfg.data.data_root) / cfg.data.name)
    meta: dict[str, Any] = {}
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, ValueError):
        pass
    meta = meta if isinstance(meta, dict) else {}
    tokenizer = meta.get("tokenizer")
    tokenizer_id = (f"{tokenizer.get('kind')}:{str(tokenizer.get('sha256', ''))[:12]}"
                    if isinstance(tokenizer, dict) else None)
    source_meta = meta.get("source")
    source = ref.get("fingerprint") or (source_meta.get("sha256") if isinstance(source_meta, dict) else None)
    return DataIdentity(name=str(ref.get("name") or cfg.data.name), source_sha256=source or None,
                        tokenizer=tokenizer_id, vocab_size=cfg.model.vocab_size)


def read_run(run_dir: str | Path) -> RunRecord:
    """A run folder as a RunRecord; NotARunError (with the reason) for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} is not a folder")
    if not (run_dir / CONFIG_FILE).is_file():
        raise NotARunError(f"{run_dir} is not a run (no {CONFIG_FILE})")
    if not (run_dir / METRICS_FILE).is_file():
        raise NotARunError(f"{run_dir} has no {METRICS_FILE} yet")
    try:
        cfg = RunConfig.load(run_dir / CONFIG_FILE)
    except MoegptError as err:
        raise NotARunError(f"{run_dir}: unreadable {CONFIG_FILE}: {err}") from None
    logs, evals, skipped, torn = read_metrics(run_dir / METRICS_FILE)
    if not logs and not evals:
        raise NotARunError(f"{run_dir}: {METRICS_FILE} holds no complete record yet")
    try:
        params = params_from_config(cfg)
    except Exception as err:  # a config this version cannot build (e.g. written by another version)
        raise NotARunError(f"{run_dir}: cannot build its model from {CONFIG_FILE}: {err}") from None
    return RunRecord(path=run_dir, config=cfg, params=params, data=data_identity(run_dir, cfg), logs=logs,
                     evals=evals, skipped_lines=skipped, torn_tail=torn)


def expand_run_args(args: list[str], runs_root: str | Path) -> tuple[list[Path], list[str]]:
    """Folders named by `args` (globs expanded here too, for quoted patterns), or every folder under
    runs_root when `args` is empty; plus one warning per argument that names nothing."""
    warnings: list[str] = []
    if not args:
        root = Path(runs_root)
        if not root.is_dir():
            return [], warnings
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), warnings
    found: list[Path] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) if GLOB_CHARS & set(arg) else [arg]
        paths = [Path(m) for m in matches if Path(m).exists()]
        if not paths:
            warnings.append(f"{arg} matches nothing")
        found += [p for p in paths if p not in found]
    return found, warnings


def read_runs(args: list[str], runs_root: str | Path = "runs") -> tuple[list[RunRecord], list[str]]:
    """The runs named by `args` (see expand_run_args) and one warning per path that is not a run."""
    paths, warnings = expand_run_args(args, runs_root)
    runs: list[RunRecord] = []
    for path in paths:
        try:
            runs.append(read_run(path))
        except NotARunError as err:
            warnings.append(f"{err}; skipped")
    folder_names = [run.path.name for run in runs]
    for run in runs:
        if folder_names.count(run.path.name) > 1:  # e.g. runs/topk and old-runs/topk
            run.label = str(run.path)
    return runs, warnings
