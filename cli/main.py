"""Entry point: `moegpt = moegpt.cli.main:app`. Each command lives in its own module and registers itself."""

from moegpt.cli import bench as _bench  # noqa: F401  (registers `moegpt bench ...`)
from moegpt.cli import bench_quality as _bench_quality  # noqa: F401  (registers `moegpt bench quality`)
from moegpt.cli import compare as _compare  # noqa: F401  (registers `moegpt compare`)
from moegpt.cli import export as _export  # noqa: F401  (registers `moegpt export`)
from moegpt.cli import inspect_routing as _inspect_routing  # noqa: F401  (registers `moegpt inspect-routing`)
from moegpt.cli import params as _params  # noqa: F401  (registers `moegpt params`)
from moegpt.cli import prepare as _prepare  # noqa: F401  (registers `moegpt prepare`)
from moegpt.cli import sample as _sample  # noqa: F401  (registers `moegpt sample`)
from moegpt.cli import train as _train  # noqa: F401  (registers `moegpt train`)
from moegpt.cli import variants as _variants  # noqa: F401  (registers `moegpt variants`)
from moegpt.cli.app import app

__all__ = ["app"]
