"""`moegpt bench ep`: refusals before any process starts, and a real P=1 vs P=2 run's JSON (no timing
assertions: only the shape and what must hold whatever the machine)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("args, fragment", [
    (["--sizes", "1,3"], "n_expert (4) is not divisible"),
    (["--sizes", "2", "--moe", "soft"], "variant 'soft'"),
    (["--sizes", "2", "--batch-size", "3"], "divisible by the number of processes (2)"),
])
def test_bench_ep_bad_sizes_are_one_line(args, fragment):
    assert_one_line_error(runner.invoke(app, ["bench", "ep", "--preset", "tiny", *args]), fragment)


@pytest.mark.slow
def test_bench_ep_json():
    result = runner.invoke(app, ["bench", "ep", "--preset", "tiny", "--sizes", "1,2", "--steps", "1", "--rounds", "1",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    one, two = out["rows"]
    assert (one["P"], two["P"]) == (1, 2) and one["ratio_to_first"] == 1.0
    assert one["bytes_per_step"] == 0 and one["exchange_share"] == 0.0
    assert two["bytes_per_step"] > 0 and 0.0 < two["exchange_share"] < 1.0
    assert all(row["tokens_per_s"] > 0 for row in out["rows"])
