"""Typer command-line interface of moegpt (installed as `moegpt.cli`)."""
