"""The native CPU kernels of the experts (csrc/), built on first use.

csrc/sorted_experts.cpp runs a whole layer's expert blocks in one parallel region per direction (the sorted
dispatch, training and full forwards): every intra-op thread takes a contiguous share of the expert-sorted
assignments and runs its experts with single-threaded kernels, and no Python runs between the ops.
csrc/decode_experts.cpp adds a generated token's chosen experts onto its residual in one call (decode).
They are compiled with the machine's C++ compiler through torch's extension builder (ninja) into one
library in a cache directory keyed by the sources' hash, so that a changed source never loads a stale
library; the first build takes several seconds and says so on stderr.

Nothing depends on it: without a compiler, with a failed build, or with MOEGPT_NATIVE=0 in the
environment, the dispatch runs its Python paths (same results to float rounding), and `reason()` says why.
Registered ops: torch.ops.moegpt_native.sorted_experts_forward / sorted_experts_backward / add_experts_
(and region_threads, for a test).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from moegpt.runtime import on_one_thread

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "sorted_experts.cpp", CSRC / "decode_experts.cpp")
HEADERS = (CSRC / "activation.h",)
DISABLE_ENV = "MOEGPT_NATIVE"
CACHE_ENV = "MOEGPT_NATIVE_CACHE"
# Activation codes the kernel takes (csrc/sorted_experts.cpp, enum Activation).
ACTIVATION_CODES = {"linear": 0, "gelu": 1, "relu": 2, "swiglu": 3}

# Fewer assignments than this run on the Python path: they make one share, on one thread, where each
# expert's small products pay the matmul library's own thread hand-off, while the Python path's expert
# ranges batch all experts into one product (README, dispatch backends).
MIN_ASSIGNMENTS = 128
# Part of the cache key with the source: bump it when the build flags change.
BUILD_FLAGS_VERSION = b"openmp-march-native-1"

_state: dict[str, object] = {}


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


def _load(name: str, build_dir: Path) -> None:
    from torch.utils.cpp_extension import load

    if not (build_dir / f"{name}.so").exists():
        print("moegpt: compiling the native expert kernel (first use on this machine, a few seconds)...",
              file=sys.stderr, flush=True)
    # -fopenmp: ATen's parallel_for is an OpenMP pragma in its header, ignored (serial) without it; the
    # library then needs libgomp.so.1, which the loader finds already loaded with torch (one thread pool).
    # -march=native: the decode kernel's plain loops vectorise for this CPU (the cache key holds it)
    load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=["-O3", "-fopenmp", "-march=native"],
         extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)


def _thread_pool_problem() -> str | None:
    """The kernels' OpenMP must be torch's own, the one pool torch.set_num_threads governs (a torch built
    with another OpenMP runtime would give the library a second pool)."""
    if on_one_thread(torch.ops.moegpt_native.region_threads, 2) != 1:
        return "its OpenMP runtime is not torch's (torch.set_num_threads does not govern it)"
    return None


def _build() -> str | None:
    """Load (building if needed) the kernels; None when loaded, else why not."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    try:
        digest = _digest()
        build_dir = _cache_dir(digest)
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            _load(f"moegpt_native_{digest}", build_dir)
    except Exception as err:  # no compiler, no ninja, no sources, a read-only cache: the Python path serves
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"build failed: {first}"
    return _thread_pool_problem()


def reason() -> str | None:
    """None when the native kernel is loaded; otherwise why it is not (builds it on the first call)."""
    if "reason" not in _state:
        _state["reason"] = why = _build()
        if why is not None and not why.startswith(DISABLE_ENV):
            print(f"moegpt: the native expert kernel is unavailable ({why}); the experts run on their Python paths",
                  file=sys.stderr, flush=True)
    return _state["reason"]  # type: ignore[return-value]


def available() -> bool:
    return reason() is None


def prepare(device: torch.device | str) -> None:
    """Build (or load) the kernels now when they would serve this device: before a run's clock starts, not
    inside its first step."""
    if torch.device(device).type == "cpu":
        reason()


class NativeSortedExperts(torch.autograd.Function):
    """SortedExperts' contract (y_NC = sum over assignments m of gate_M[m] * expert_{e(m)}(x_NC[tok_M[m]]),
    tok_M sorted by expert) through the native kernel: fp32 on CPU, one parallel region per direction."""

    @staticmethod
    def forward(ctx, x_NC, gate_M, w_in, w_out, tok_M, counts_E, activation):
        code = ACTIVATION_CODES[activation]
        y_NC, h_MHin, a_MH = torch.ops.moegpt_native.sorted_experts_forward(
            x_NC, tok_M, gate_M, counts_E, w_in, w_out, code)
        ctx.save_for_backward(x_NC, gate_M, w_in, w_out, tok_M, counts_E, h_MHin, a_MH)
        ctx.code = code
        return y_NC

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_NC):
        x_NC, gate_M, w_in, w_out, tok_M, counts_E, h_MHin, a_MH = ctx.saved_tensors
        grad_x, grad_gate, grad_w_in, grad_w_out = torch.ops.moegpt_native.sorted_experts_backward(
            grad_y_NC.contiguous(), x_NC, tok_M, gate_M, counts_E, w_in, w_out, h_MHin, a_MH, ctx.code)
        return grad_x, grad_gate, grad_w_in, None if w_out is None else grad_w_out, None, None, None


def serves(x_NC: torch.Tensor, gate_M: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor | None,
           compute_dtype: torch.dtype, bucket: int, activation: str) -> bool:
    """Whether the sorted kernel takes this call: fp32 on CPU, at least MIN_ASSIGNMENTS assignments, no
    bucketing, not under torch.compile."""
    if gate_M.shape[0] < MIN_ASSIGNMENTS or bucket != 1 or compute_dtype != torch.float32:
        return False
    return _takes(activation, x_NC, gate_M, w_in, w_out)


def serves_decode(residual_NC: torch.Tensor, x_NC: torch.Tensor, gate_NK: torch.Tensor, w_in: torch.Tensor,
                  w_out: torch.Tensor | None, activation: str) -> bool:
    """Whether the decode kernel takes this call: fp32 on CPU, contiguous expert banks, not under
    torch.compile."""
    if not (w_in.is_contiguous() and (w_out is None or w_out.is_contiguous())):
        return False
    return _takes(activation, residual_NC, x_NC, gate_NK, w_in, w_out)


def _takes(activation: str, *tensors: torch.Tensor | None) -> bool:
    """The kernels' common ground: fp32 CPU tensors, a known activation, eager mode, a built library."""
    if torch.compiler.is_compiling() or activation not in ACTIVATION_CODES:
        return False
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        return False
    return available()
