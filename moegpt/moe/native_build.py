"""Building and loading the native kernels' library (csrc/), for native.py.

The sources are compiled with the machine's C++ compiler through torch's extension builder (ninja, with
OpenMP and -march=native) into a cache directory keyed by the sources, the build flags, the torch version
and the CPU, so a changed source or another CPU never loads a stale library. An existing library loads
directly (no compiler, ninja or lock needed: a read-only cache works); a build that failed is remembered
in its directory and not retried until that directory is deleted.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "sorted_experts.cpp", CSRC / "fused_activation.cpp", CSRC / "decode_experts.cpp",
           CSRC / "decode_matmul.cpp", CSRC / "decode_attention.cpp", CSRC / "helper_thread.cpp",
           CSRC / "softmax_topk_routing.cpp", CSRC / "expert_softmax.cpp",
           CSRC / "sort_assignments.cpp")
HEADERS = (CSRC / "activation.h", CSRC / "fused_activation.h", CSRC / "decode_rows.h", CSRC / "inplace.h",
           CSRC / "helper_thread.h", CSRC / "vec_capability.h", CSRC / "expert_softmax.h",
           CSRC / "segment_rows.h")
CACHE_ENV = "MOEGPT_NATIVE_CACHE"
# Part of the cache key with the sources: bump it when the build flags change.
BUILD_FLAGS_VERSION = b"openmp-march-native-1"
FAILED_MARK = "build-failed.txt"


def load_library() -> str | None:
    """Load the library, building it first if needed; None when loaded, else why not."""
    try:
        digest = _digest()
        build_dir = _cache_dir(digest)
        library = build_dir / f"moegpt_native_{digest}.so"
        if library.exists():
            torch.ops.load_library(str(library))
            return None
        if (build_dir / FAILED_MARK).exists():
            why = (build_dir / FAILED_MARK).read_text().strip()
            return f"{why}; an earlier build in {build_dir} (delete it to retry)"
        build_dir.mkdir(parents=True, exist_ok=True)
    except Exception as err:  # no sources, an unreadable cache, a damaged library
        return f"cannot load: {_first_error(err)}"
    try:
        with _build_lock(build_dir):
            _compile(library.stem, build_dir)
    except Exception as err:  # no compiler, no OpenMP, no ninja, a read-only cache
        why = f"build failed: {_first_error(err)}"
        with contextlib.suppress(OSError):
            (build_dir / FAILED_MARK).write_text(why + "\n")
        return why
    return None


def _cache_dir(digest: str) -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moegpt"
    return Path(root) / "native" / f"torch-{torch.__version__}-{digest}"
def _cpu_identity() -> bytes:
    """What -march=native compiles for: a cache shared between machines (a network home) must not hand one
    CPU's library to another that lacks its instructions. x86 names its model and flags, ARM its parts and
    features."""
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(keys)})).encode()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def _digest() -> str:
    """The library's cache key: its sources, build flags and CPU."""
    key = b"".join(f.read_bytes() for f in SOURCES + HEADERS) + BUILD_FLAGS_VERSION + _cpu_identity()
    return hashlib.sha256(key).hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """One build at a time across processes (a torchrun's ranks), under a lock the OS drops when its holder
    dies. torch's own lock file outlives a killed build and torch then waits for it forever: holding ours,
    any such file is stale and goes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    with open(build_dir / "moegpt.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(name: str, build_dir: Path) -> None:
    from torch.utils.cpp_extension import load

    if not (build_dir / f"{name}.so").exists():  # another process may have built it while this one waited
        print("moegpt: compiling the native kernels (routing, experts and decode steps; once per machine and torch "
              "version, about ten seconds)...", file=sys.stderr, flush=True)
    # -fopenmp: ATen's parallel_for is an OpenMP pragma in its header, ignored (serial) without it; the
    # library then needs libgomp.so.1, which the loader finds already loaded with torch (one thread pool).
    # -march=native: the decode kernels' plain loops vectorise for this CPU (the cache key holds it)
    with _quiet_builder():
        load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=["-O3", "-fopenmp", "-march=native"],
             extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)


@contextlib.contextmanager
def _quiet_builder() -> Iterator[None]:
    """torch's builder logs compiler warnings (a banner of !!!s for an unknown compiler): a failure is
    reported in one line instead."""
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        builder_log.setLevel(level)


def _first_error(err: Exception) -> str:
    """The compiler's first error line when the message holds one (ninja quotes whole command lines first),
    else the message's first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() and not ln.startswith("FAILED:")]
    first = (errors or lines or [type(err).__name__])[0]
    return first if len(first) <= 240 else first[:237] + "..."
