"""A checkpoint with finite weights whose forward pass overflows: sampling and inspection stop with one
line naming the checkpoint, its step and (inspection) the layer, exit 1, instead of a traceback or
silent garbage."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import assert_one_line_failure, train_tiny
from typer.testing import CliRunner

from moegpt.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from moegpt.cli.main import app
from moegpt.errors import NonFiniteOutput
from moegpt.finite import check_logits, first_non_finite
from moegpt.generate import generate
from moegpt.runs import load_run

runner = CliRunner()


@pytest.fixture(scope="module")
def overflowing(tiny_data, tmp_path_factory):
    """A copy of a trained checkpoint whose layer-1 experts are huge but finite: their output overflows."""
    runs = tmp_path_factory.mktemp("runs")
    result = train_tiny(tiny_data, runs, "d")
    assert result.exit_code == 0, result.output
    state = load_checkpoint(resolve_checkpoint(runs / "d"))
    for name in ("w_in", "w_out"):
        state["model"][f"blocks.1.ffn.experts.{name}"].mul_(1e22)
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    path = tmp_path_factory.mktemp("ckpt") / "diverged.pt"
    save_checkpoint(path, state)
    return path


@pytest.mark.parametrize("temperature", ["0.8", "0"])
def test_sample_stops_on_non_finite_logits(overflowing, temperature):
    result = runner.invoke(app, ["sample", str(overflowing), "--temperature", temperature, "--seed", "1",
                                 "--max-new-tokens", "5"])
    assert_one_line_failure(result, "diverged.pt", "training step 2", "non-finite logits",
                            "at generated token 1")


def test_inspect_routing_names_the_layer(overflowing):
    result = runner.invoke(app, ["inspect-routing", str(overflowing), "--tokens", "1024"])
    assert_one_line_failure(result, "diverged.pt", "training step 2", "non-finite cross-entropy", "layer 1 (MoE)")


def test_library_generation_raises(overflowing):
    model = load_run(overflowing).model
    with pytest.raises(NonFiniteOutput, match="generated token 1"):
        generate(model, [1, 2, 3], max_new_tokens=3, temperature=0)
    assert first_non_finite(model, torch.tensor([[1, 2, 3]])) == "layer 1 (MoE)"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_logits_finds_any_non_finite_logit_and_passes_huge_finite_ones(bad, dtype):
    huge = torch.full((2, 64), torch.finfo(dtype).max, dtype=dtype)  # their sum overflows fp32, not float64
    check_logits(huge, "at generated token 1")
    check_logits(-huge, "at generated token 1")
    broken = huge.clone()
    broken[1, 17] = bad
    with pytest.raises(NonFiniteOutput, match="at generated token 1"):
        check_logits(broken, "at generated token 1")
