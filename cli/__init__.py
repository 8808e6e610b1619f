"""Typer command-line interface of moegpt (installed as `moegpt.cli`).

First thing, before any command can import torch: OpenMP's short spin-then-sleep wait (moegpt/threads.py).
"""

from moegpt.threads import prefer_short_spin

prefer_short_spin()
