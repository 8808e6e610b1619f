"""How many intra-op threads torch uses, and how its OpenMP threads wait.

OpenMP threads that finish their share of an op spin at a barrier for the others (libgomp: 300,000
spins, then sleep). When another process is busy on one of the cores (a browser, a second training run),
the spinning thread burns its core while the one it waits for sits descheduled, and every op pays a
scheduler time slice: training slows by several times while producing identical numbers. Never spinning
(OMP_WAIT_POLICY=PASSIVE) fixes that but makes every hand-off a wake-up, which a MoE step of many small
ops pays on an idle machine. A short spin before sleeping keeps both: moegpt sets GOMP_SPINCOUNT (libgomp,
torch's OpenMP on Linux) and KMP_BLOCKTIME (LLVM/Intel OpenMP) to short values (README, "Threads", has
the measurements). OpenMP reads them once, when torch loads it, so `prefer_short_spin` must run before
`import torch`; the CLI calls it first thing, and any wait setting the user made is kept.
"""

from __future__ import annotations

import os

from moegpt.errors import MoegptError

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SHORT_SPIN = {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "1"}  # spins (libgomp) / milliseconds (LLVM, Intel)


def prefer_short_spin() -> None:
    """Waiting OpenMP threads spin briefly, then sleep, unless the user set any wait setting. Before torch loads."""
    if not any(name in os.environ for name in WAIT_SETTINGS):
        os.environ.update(SHORT_SPIN)


def wait_policy() -> str:
    """How OpenMP threads wait in this process, for bench headers: 'short spin', the user's policy, or 'default'."""
    if os.environ.get("OMP_WAIT_POLICY"):
        return os.environ["OMP_WAIT_POLICY"].lower()
    if os.environ.get("GOMP_SPINCOUNT") == SHORT_SPIN["GOMP_SPINCOUNT"]:
        return "short spin"
    return f"spin {os.environ['GOMP_SPINCOUNT']}" if os.environ.get("GOMP_SPINCOUNT") else "default"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all of the machine's where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(spec: str | int) -> int:
    """'auto': OMP_NUM_THREADS when set (torchrun sets 1 per rank), else every usable core; or N >= 1."""
    text = str(spec).strip().lower()
    if text == "auto":
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        return int(env) if env.isdigit() and int(env) >= 1 else usable_cores()
    if not text.isdigit() or int(text) < 1:
        raise MoegptError(f"threads must be a whole number >= 1 or 'auto' (got {spec!r})")
    return int(text)


def apply_threads(spec: str | int) -> int:
    """Set torch's intra-op thread count from `spec`; returns the count."""
    import torch  # here: resolving a bad value must not wait for torch

    threads = resolve_threads(spec)
    torch.set_num_threads(threads)
    return threads

