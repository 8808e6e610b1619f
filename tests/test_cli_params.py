"""`moegpt params` and the CLI's error contract: bad input is one line `moegpt: error: ...`, exit 2."""

from __future__ import annotations

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.moe import VARIANTS

TINY = ["--preset", "tiny"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))




def test_params_topk_reports_total_and_active():
    result = invoke("params", "--moe", "topk", "--n-expert", "8", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert "total params" in result.stdout and "active params" in result.stdout
    assert "8 / 2" in result.stdout  # experts / per token
    assert result.stderr == ""


@pytest.mark.parametrize("variant", VARIANTS)
def test_params_every_variant(variant):
    result = invoke("params", *TINY, "--moe", variant)
    assert result.exit_code == 0, result.output
    assert variant in result.stdout and "total params" in result.stdout


def test_params_bogus_variant_is_one_line_listing_valid_variants():
    result = invoke("params", "--moe", "bogus")
    assert_one_line_error(result, "bogus", *VARIANTS)


@pytest.mark.parametrize("assignment,fragment", [
    ("moe.nope=1", "unknown key 'moe.nope'"),
    ("nosection", "--set expects section.key=value"),
    ("moe.n_expert=abc", "moe.n_expert must be of type int"),
    ("moe.top_k=99", "moe.top_k must be in"),
])
def test_params_bad_set(assignment, fragment):
    assert_one_line_error(invoke("params", *TINY, "--set", assignment), fragment)


def test_params_set_is_applied():
    result = invoke("params", *TINY, "--set", "moe.n_expert=6", "--set", "moe.top_k=3")
    assert result.exit_code == 0, result.output
    assert "6 / 3" in result.stdout


def test_unknown_option_is_one_line():
    assert_one_line_error(invoke("params", "--bogus-flag"), "--bogus-flag")


def test_bad_flag_value_is_one_line():
    assert_one_line_error(invoke("params", "--n-expert", "many"), "--n-expert")


def test_missing_config_file_is_one_line(tmp_path):
    assert_one_line_error(invoke("params", "--config", str(tmp_path / "none.toml")), "config file not found")


def test_params_reads_a_config_file_and_flags_override_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layer = 3\nn_embd = 64\nn_head = 2\n'
                    '[moe]\nvariant = "switch"\nn_expert = 4\n')
    result = invoke("params", "--config", str(path), "--n-layer", "2")
    assert result.exit_code == 0, result.output
    assert "2 x 64 x 2" in result.stdout and "switch" in result.stdout


def test_params_shows_kv_cache_bytes_per_token_for_mha_and_mla():
    result = invoke("params", "--preset", "deepseek")
    assert result.exit_code == 0, result.output
    assert "llama / mla" in result.stdout
    assert "4,096 B fp32" in result.stdout  # MHA: 4 layers x (K + V) x 128 x 4 bytes
    assert "1,280 B fp32" in result.stdout  # MLA: 4 layers x (64 + 16) x 4 bytes
