"""Where and how a model runs: device choice, precision (autocast), and torchrun/DDP setup."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from moegpt.config import precision_problem
from moegpt.errors import MoegptError

T = TypeVar("T")


def resolve_device(requested: str = "auto") -> torch.device:
    """auto = cuda > mps > cpu; an explicit device that is not available is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise MoegptError(f"--device {requested}: CUDA is not available on this machine (use cpu or auto)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MoegptError(f"--device {requested}: MPS is not available on this machine (use cpu or auto)")
    if kind not in ("cpu", "cuda", "mps"):
        raise MoegptError(f"unknown device {requested!r}; valid: auto, cpu, cuda[:N], mps")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` picks bf16 only where it is known to be faster: CUDA GPUs with bf16 support.

    On CPU, bf16 autocast speeds up a dense model but a sort-based MoE builds a new oneDNN primitive
    for every new per-expert row count (they change every step), so auto stays fp32 there
    (`moegpt bench model --precision both` measures it on your machine).
    """
    problem = precision_problem(requested)
    if problem:
        raise MoegptError(problem)
    if requested == "fp32":
        return "fp32"
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise MoegptError("precision bf16: this GPU does not support bfloat16")
        return "bf16"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_request: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request.startswith("cuda") or (device_request == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


# Per Python thread: the intra-op thread counts that its enclosing one_thread() blocks replaced.
_caller_threads = threading.local()


def _replaced() -> list[int]:
    stack = getattr(_caller_threads, "stack", None)
    if stack is None:
        stack = _caller_threads.stack = []
    return stack


class one_thread:  # noqa: N801 - a context manager, named like torch.no_grad
    """The block runs with one intra-op CPU thread, the caller's thread count restored afterwards: for ops far
    too small to share, where handing work to a second OpenMP thread costs more than the work (README,
    "Threads"). Inside, `caller_threads()` says how many the caller had, for the few ops big enough to share.
    A class rather than a generator: training enters it per expert block."""

    def __enter__(self) -> None:
        self.threads = threads = torch.get_num_threads()
        _replaced().append(threads)
        if threads != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc_info: object) -> None:
        _replaced().pop()
        if self.threads != 1:
            torch.set_num_threads(self.threads)


def caller_threads() -> int:
    """The intra-op threads of the code around the innermost `one_thread()` block (outside one: the current
    count)."""
    stack = _replaced()
    return stack[-1] if stack else torch.get_num_threads()


def on_one_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) inside `one_thread()`."""
    with one_thread():
        return fn(*args)


def leave_process_group(clean: bool) -> None:
    """Tear down gloo/nccl only once every rank is done with it.

    A rank that destroys the group (and exits) while its peer is still inside a collective, or while
    DDP wrappers and autograd graphs still hold the group, can abort in gloo's teardown ("terminate
    called without an active exception"). After a clean run every rank meets at a barrier first; after
    a failure a barrier could wait forever on a rank that already died, so the group is destroyed
    directly.
    """
    if not dist.is_initialized():
        return
    gc.collect()  # drop DDP wrappers and autograd graphs still tied to the group
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def run_spawned_rank(work: Callable[[], object]) -> NoReturn:
    """Run a rank's work in a process that torch.multiprocessing started, inside an initialized group.

    After the work (which leaves its results on disk) the rank leaves the group cleanly and skips
    interpreter finalization (os._exit): a normal exit destroys gloo's C++ objects during finalization,
    which now and then aborts a rank whose work was complete ("terminate called without an active
    exception") and fails the whole launch for nothing. A failing rank tears the group down without
    waiting for its peers and raises as usual. Only for spawned children: a torchrun rank or a user's
    own process exits normally.
    """
    try:
        work()
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            leave_process_group(clean=False)
        raise
    leave_process_group(clean=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def device_for_rank(info: DistInfo, requested: str) -> torch.device:
    device = resolve_device(requested)
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device
