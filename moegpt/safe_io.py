"""Writes that fail cleanly: a full disk, an I/O error or a refused permission becomes one `WriteFailed`
(exit status 1, a runtime failure rather than bad input), and what was written before stays whole.

- `append_line`: a JSON-lines record is appended whole or not at all (a failed write is cut back off).
- `write_text_atomic`: temp file, fsync, rename; the old file stays until the new one is complete.
- `read_jsonl`: reads records, dropping a torn last line (a writer killed mid-line); a bad line elsewhere
  is an error.
- `write_bytes`: an output file written in place, removed again when the write fails.
- `write_failures_as_errors`: turns such an OSError raised inside it into a `WriteFailed` with context.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moegpt.errors import MoegptError, WriteFailed

WRITE_FAILURE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS,
                        errno.EFBIG}

_write = os.write  # the one place bytes reach a file here; tests replace it to inject failures


def is_write_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in WRITE_FAILURE_ERRNOS


def describe(err: OSError) -> str:
    """'No space left on device (errno 28)' (plus the file when the OSError names one)."""
    text = f"{err.strerror or err} (errno {err.errno})"
    return f"{text}: {err.filename}" if err.filename else text


@contextlib.contextmanager
def write_failures_as_errors(what: str, kept: str = "") -> Iterator[None]:
    """Inside: an OSError from a full disk, EIO or EACCES becomes WriteFailed('<what>: <reason>; <kept>')."""
    try:
        yield
    except OSError as err:
        if not is_write_failure(err):
            raise
        raise WriteFailed(f"{what}: {describe(err)}" + (f"; {kept}" if kept else "")) from err


def append_line(path: str | Path, line: str) -> None:
    """Append `line` + newline whole, or leave the file as it was and raise WriteFailed."""
    path, data = Path(path), memoryview((line + "\n").encode())
    with write_failures_as_errors(f"cannot append to {path}", "its earlier records are intact"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    data = data[_write(fd, data):]
            except OSError:
                with contextlib.suppress(OSError):  # cut the torn tail off, so the file stays line-whole
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` through a synced temp file; on failure the old file is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with write_failures_as_errors(f"cannot write {path}", "the previous version is intact"):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[_write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write an output file (a report, an image) in place; a failed write removes the partial file."""
    path = Path(path)
    with write_failures_as_errors(f"cannot write {path}"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view):]
        except OSError:
            if path.is_file():  # never a device or pipe given as the destination
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        finally:
            os.close(fd)


def read_step_records(path: str | Path) -> tuple[list[dict[str, Any]], int, bool]:
    """(records that carry an integer "step", complete lines skipped as unreadable, whether a torn last line
    was dropped) of a metrics file that may still be being written. Never raises on its content: for the
    readers of a run (compare, inspect-routing, export), unlike `read_jsonl` for the trainer's own resume."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    complete, _, tail = text.rpartition("\n")
    records, skipped = [], 0
    for line in complete.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped += 1
    return records, skipped, bool(tail.strip())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON records of a JSON-lines file; an unterminated or unparsable last line is dropped."""
    path = Path(path)
    raw = path.read_text(errors="replace")
    lines = raw.split("\n")
    torn = lines.pop()  # text after the last newline: empty, or a line whose write never finished
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not torn.strip():  # the last line, torn but newline-terminated
                continue
            raise MoegptError(f"{path}: line {number} is not JSON (the file was edited or damaged)") from None
    return records
