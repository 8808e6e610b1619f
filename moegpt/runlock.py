"""One live trainer per run folder: an OS-level lock on `<run>/train.lock`.

The lock is `fcntl.flock` on an open file, so the kernel drops it when the holder exits for any reason
(kill -9 included): a lock file left behind is never stale, whoever opens it next simply gets the lock.
The file holds the holder's pid, only so that a refused trainer can name it. Readers (sampling,
inspection) never take the lock: checkpoints appear by atomic rename, so they always read a complete one.
"""

from __future__ import annotations

import os
from pathlib import Path

from moegpt.errors import MoegptError

LOCK_NAME = "train.lock"

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunBusy(MoegptError):
    """Another live process trains this run folder."""


class RunLock:
    """Held while a trainer owns a run folder; `release()` (or process exit) gives it back."""

    def __init__(self, run_dir: Path, fd: int | None) -> None:
        self.path, self._fd = Path(run_dir) / LOCK_NAME, fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return cls(run_dir, None)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise RunBusy(f"{run_dir} is being trained by {who}; wait for it to finish or use another run "
                          "name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(run_dir, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file releases the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
