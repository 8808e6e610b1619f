"""Entry point: `moegpt = moegpt.cli.main:app`. Each command lives in its own module and registers itself."""

from moegpt.cli import params as _params  # noqa: F401  (registers `moegpt params`)
from moegpt.cli.app import app

__all__ = ["app"]
