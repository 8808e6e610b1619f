"""Stop-signal handling shared by the trainer and the checkpoint writer (moegpt/signals.py)."""

from __future__ import annotations

import os
import signal
import threading

from moegpt.signals import STOP_SIGNALS, stop_signals_handled


def test_handler_runs_inside_and_previous_handlers_come_back():
    seen: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with stop_signals_handled(lambda signum, frame: seen.append(signum)):
        os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_off_the_main_thread_nothing_is_swapped():
    result = {}

    def worker():
        with stop_signals_handled(lambda signum, frame: None):
            result["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result["handler"] == before
