"""How many intra-op threads torch uses, and how its OpenMP threads wait.

OpenMP threads that finish their share of an op spin at a barrier for the others by default. When
another process is busy on one of the cores (a browser, a second training run), the spinning thread
burns its core while the one it waits for sits descheduled, and every op pays a scheduler time slice:
training slows by an order of magnitude while producing identical numbers. The passive wait policy
makes waiting threads sleep instead, which costs little on an idle machine. libgomp reads
OMP_WAIT_POLICY once, when torch loads it, so `prefer_passive_wait` must run before `import torch`;
the CLI calls it first thing, and a value the user set is kept.
"""

from __future__ import annotations

import os

from moegpt.errors import MoegptError

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> None:
    """Ask OpenMP for sleeping (not spinning) waits, unless the user chose a policy. Before torch loads."""
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


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

