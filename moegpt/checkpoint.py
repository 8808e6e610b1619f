"""Crash-safe checkpoints: atomic writes, a verified content hash, and safe (weights_only) loading.

File layout (all integers little-endian)::

    magic    8 bytes   b"MOEGPTCK"
    version  uint32    FORMAT_VERSION
    sha256   64 bytes  hex digest (ASCII) of the payload
    length   uint64    payload length in bytes
    payload  `length` bytes of `torch.save(state)`

A checkpoint is written to `.<name>.tmp-<pid>` in the destination folder, fsync'd, renamed over the
destination with `os.replace` and the folder fsync'd, so a reader sees either the old file or the
complete new one, never a mix. The header's length and hash catch truncation and bit rot before the
payload reaches the unpickler, and the payload is only ever unpickled with `weights_only=True`, so a
file that smuggles in code is refused without running it.

Fault hook (tests only): `MOEGPT_FAULT_KILL_DURING_CKPT=1` makes the process SIGKILL itself after
writing part of the temp file, to show the previous checkpoint survives a crash mid-save.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import signal
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from moegpt.digest import file_sha256
from moegpt.errors import MoegptError, WriteFailed
from moegpt.signals import stop_signals_handled

CKPT_SUFFIX = ".pt"
CKPT_DIRNAME = "ckpt"
BEST_NAME = "best" + CKPT_SUFFIX
MAGIC = b"MOEGPTCK"
FORMAT_VERSION = 1
FAULT_ENV = "MOEGPT_FAULT_KILL_DURING_CKPT"

_HEADER = struct.Struct("<8sI64sQ")
HEADER_SIZE = _HEADER.size
_STEP_RE = re.compile(r"^step_(\d+)" + re.escape(CKPT_SUFFIX) + r"$")
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_CHUNK = 8 << 20

# Exactly the leaf types that `torch.load(weights_only=True)` accepts on every torch this package
# supports (>= 2.5). Checked at save time so a trainer bug (a numpy scalar, a dataclass) fails loudly
# when the checkpoint is written instead of producing a file that can never be loaded back.
_LEAF_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_DICT_TYPES = (dict, OrderedDict)
_SEQ_TYPES = (list, tuple)


# --------------------------------------------------------------------------------------------- signals


class DeferredSignals:
    """What `signals_deferred()` yields: the signals that arrived inside the block, in arrival order."""

    def __init__(self) -> None:
        self.pending: list[int] = []


@contextlib.contextmanager
def signals_deferred() -> Iterator[DeferredSignals]:
    """Hold back SIGINT/SIGTERM for the duration of the block, then deliver them to the previous handlers.

    Swapping the Python-level handlers (rather than `pthread_sigmask` on the main thread) is what makes
    this hold in a multi-threaded process: the kernel may hand a process-directed signal to any thread
    that does not block it (torch keeps worker threads), and a default-action SIGTERM would then kill
    the process mid-write. A signal that arrives several times is delivered once, like the kernel's own
    coalescing of pending signals. Off the main thread handlers cannot be changed; there the block runs
    unprotected (Python runs handlers on the main thread only, so they cannot interrupt this thread).
    """
    deferred = DeferredSignals()

    def _record(signum: int, _frame: object) -> None:
        if signum not in deferred.pending:
            deferred.pending.append(signum)

    try:
        with stop_signals_handled(_record):
            yield deferred
    finally:
        _redeliver(deferred.pending)


def _redeliver(signums: list[int]) -> None:
    # raise_signal runs a Python handler before returning, so a handler that raises (default SIGINT ->
    # KeyboardInterrupt) would swallow the signals after it; deliver all of them, then raise the first.
    first: BaseException | None = None
    for sig in signums:
        try:
            signal.raise_signal(sig)
        except BaseException as exc:  # noqa: B036 - re-raised below once every signal is delivered
            if first is None:
                first = exc
    if first is not None:
        raise first


# ------------------------------------------------------------------------------------------ save/load


def _check_state(obj: object, where: str = "state") -> None:
    """Raise TypeError naming the first value `torch.load(weights_only=True)` would refuse."""
    kind = type(obj)
    if kind in _TENSOR_TYPES or kind in _LEAF_TYPES:
        return
    if kind in _DICT_TYPES:
        for key, value in obj.items():  # type: ignore[attr-defined]
            if type(key) not in _LEAF_TYPES:
                raise TypeError(f"checkpoint {where} has a key of type {_kind_name(key)}: {key!r}")
            _check_state(value, f"{where}[{key!r}]")
        return
    if kind in _SEQ_TYPES:
        for i, value in enumerate(obj):  # type: ignore[arg-type]
            _check_state(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {_kind_name(obj)}, which weights_only loading refuses; "
        "store tensors, dicts, lists, tuples, str, int, float, bool or None"
    )


def _kind_name(obj: object) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _serialize(state: dict) -> tuple[bytes, memoryview]:
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {_kind_name(state)}")
    _check_state(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()  # a view, not a copy: checkpoints can be large
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, hashlib.sha256(payload).hexdigest().encode("ascii"),
                          len(payload))
    return header, payload


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_payload(f: BinaryIO, header: bytes, payload: memoryview) -> None:
    """Write header + payload; the one place the test-only crash hook lives."""
    f.write(header)
    if os.environ.get(FAULT_ENV) == "1":
        # Leave a partial file on disk (flushed, so it is really there), then die the way a power cut
        # or OOM kill would: no handlers, no finally blocks.
        f.write(payload[: max(1, len(payload) // 2)])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    for start in range(0, len(payload), _CHUNK):
        f.write(payload[start:start + _CHUNK])


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem can open a folder for fsync.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, header: bytes, payload: memoryview) -> None:
    tmp = _tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            _write_payload(f, header, payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteFailed(f"cannot write checkpoint {path}: {exc.strerror or exc}; earlier checkpoints are "
                          "intact") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically write `state` (tensors and plain containers only) to `path` with a sha256 header.

    The whole save runs inside `signals_deferred()`: Ctrl-C or SIGTERM during it is acted on once the
    file is complete. TypeError for a state weights_only loading would refuse (a bug in the caller);
    MoegptError if the file cannot be written (disk full, permissions), leaving any old file intact.
    """
    path = Path(path)
    with signals_deferred():
        header, payload = _serialize(state)
        _write_atomic(path, header, payload)


def _read_header(raw: bytes, path: Path) -> tuple[str, int]:
    """Validate the header against the file size; return (sha256 hex, payload length)."""
    if not raw:
        raise MoegptError(f"checkpoint corrupt: {path}: empty file")
    if raw[: len(MAGIC)] != MAGIC[: len(raw)]:
        raise MoegptError(f"checkpoint corrupt: {path}: bad magic bytes (not a moegpt checkpoint file)")
    if len(raw) < HEADER_SIZE:
        raise MoegptError(f"checkpoint corrupt: {path}: truncated header ({len(raw)} bytes)")
    _, version, digest, length = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise MoegptError(f"unsupported checkpoint format version {version} in {path} "
                          f"(this moegpt reads version {FORMAT_VERSION})")
    found = len(raw) - HEADER_SIZE
    if found < length:
        raise MoegptError(f"checkpoint corrupt: {path}: truncated (payload {found} of {length} bytes)")
    if found > length:
        raise MoegptError(f"checkpoint corrupt: {path}: {found - length} unexpected trailing bytes")
    try:
        return digest.decode("ascii"), length
    except UnicodeDecodeError:
        raise MoegptError(f"checkpoint corrupt: {path}: damaged header") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """Read `path`, verify its length and sha256, and unpickle it with `weights_only=True`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MoegptError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise MoegptError(f"checkpoint {path} is a folder, not a checkpoint file") from None
    except OSError as exc:
        raise MoegptError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    digest, _ = _read_header(raw, path)
    payload = memoryview(raw)[HEADER_SIZE:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise MoegptError(f"checkpoint corrupt: {path}: content hash mismatch")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, the one thing never to do with this file; name
        # the offending global instead.
        culprit = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it references {culprit.group(1)})" if culprit else ""
        raise MoegptError(f"checkpoint refused: {path}: it contains non-tensor objects or code{what}; "
                          "it was not loaded and nothing in it was run") from None
    except Exception as exc:  # e.g. a CUDA map_location on a machine without CUDA
        raise MoegptError(f"cannot load checkpoint {path}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise MoegptError(f"checkpoint corrupt: {path}: payload is a {_kind_name(state)}, not a dict")
    return state


def checkpoint_hash(path: str | Path) -> str:
    """sha256 hex of the whole file, e.g. to show a command left a checkpoint byte-for-byte unchanged."""
    path = Path(path)
    try:
        return file_sha256(path)
    except FileNotFoundError:
        raise MoegptError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise MoegptError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def _looks_valid(path: Path) -> bool:
    """Cheap check (header only, no hashing): right magic/version and the size the header promises."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < HEADER_SIZE:
        return False
    magic, version, _, length = _HEADER.unpack(head)
    return magic == MAGIC and version == FORMAT_VERSION and size == HEADER_SIZE + length


# --------------------------------------------------------------------------------------------- manager


def _step_files(ckpt_dir: Path) -> list[Path]:
    """Step files in `ckpt_dir`, oldest step first (by number, so step_1000000 sorts after step_999999)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _latest_in(ckpt_dir: Path) -> Path | None:
    for p in reversed(_step_files(ckpt_dir)):
        if _looks_valid(p):
            return p
    return None


def _best_in(ckpt_dir: Path) -> Path | None:
    p = ckpt_dir / BEST_NAME
    return p if p.is_file() and _looks_valid(p) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or cannot tell: leave its file alone
        return True
    return True


class CheckpointManager:
    """Step checkpoints in `run_dir/ckpt`: `step_000123.pt`, the newest `keep` of them, plus `best.pt`."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise MoegptError(f"keep must be >= 1 (got {keep})")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CKPT_DIRNAME
        self.keep = keep
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        # Temp files of a process that died mid-save (kill -9, power loss). A live owner's temp file is
        # kept: it may be another process saving into this run right now.
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            m = _TMP_RE.match(p.name)
            if m and int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid"))):
                with contextlib.suppress(OSError):
                    p.unlink()

    def step_path(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}{CKPT_SUFFIX}"

    def save(self, step: int, state: dict, is_best: bool = False) -> Path:
        """Write the step file, refresh best.pt if `is_best`, prune old step files; return the step file.

        One `signals_deferred()` block spans all three, so a Ctrl-C cannot leave a new step file with a
        stale best.pt. best.pt is a hardlink to the step file (no extra disk, survives pruning of the
        step file), swapped in with os.replace; where hardlinks are unsupported it is a second copy.
        """
        if step < 0:
            raise MoegptError(f"step must be >= 0 (got {step})")
        path = self.step_path(step)
        with signals_deferred():
            header, payload = _serialize(state)
            _write_atomic(path, header, payload)
            if is_best:
                self._update_best(path, header, payload)
            self._prune()
        return path

    def _update_best(self, src: Path, header: bytes, payload: memoryview) -> None:
        best = self.dir / BEST_NAME
        tmp = _tmp_path(best)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
            os.replace(tmp, best)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _write_atomic(best, header, payload)
            return
        _fsync_dir(self.dir)

    def _prune(self) -> None:
        for old in _step_files(self.dir)[: -self.keep]:
            # A file we cannot delete only costs disk space; it must not stop a training run.
            with contextlib.suppress(OSError):
                old.unlink()

    def latest(self) -> Path | None:
        """Newest step file whose header is intact (temp files and damaged files are skipped)."""
        return _latest_in(self.dir)

    def best(self) -> Path | None:
        return _best_in(self.dir)

    def all(self) -> list[Path]:
        """Step files, oldest first."""
        return _step_files(self.dir)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (or its ckpt/ folder) -> best.pt if present, else the latest step file; a file -> itself.

    Read-only: unlike CheckpointManager it never deletes stale temp files, so inspection commands do not
    modify a run.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise MoegptError(f"checkpoint not found: {path}")
    # A run folder holds ckpt/; anything else (the ckpt/ folder itself) is searched directly.
    ckpt_dir = path / CKPT_DIRNAME if (path / CKPT_DIRNAME).is_dir() else path
    found = _best_in(ckpt_dir) or _latest_in(ckpt_dir)
    if found is None:
        damaged = _step_files(ckpt_dir) + [p for p in [ckpt_dir / BEST_NAME] if p.exists()]
        if damaged:
            names = ", ".join(p.name for p in damaged)
            raise MoegptError(f"no valid checkpoint in {path} (damaged: {names})")
        raise MoegptError(f"no checkpoint in {path}")
    return found
