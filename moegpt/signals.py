"""The one place that swaps SIGINT/SIGTERM handlers (the trainer's stop flag, the checkpoint writer's deferral)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_handled(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Run the block with `handler` for SIGINT and SIGTERM, then restore the previous handlers.

    Off the main thread handlers cannot be changed (Python runs them on the main thread only, so they could
    not interrupt this thread anyway): the block then runs with the handlers it had. A handler installed
    outside Python (getsignal() is None) is left alone, since signal.signal could not restore it.
    """
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not None:
                    previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
