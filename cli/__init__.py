"""Typer command-line interface of moegpt (installed as `moegpt.cli`).

First thing, before any command can import torch: OpenMP's passive wait policy (moegpt/threads.py).
"""

from moegpt.threads import prefer_passive_wait

prefer_passive_wait()
