"""The causality audit: suffix perturbation and full-vs-cached routing agreement (docs/architecture.md, "Causality")."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.errors import MoegptError
from moegpt.inspect.causality import perturb_suffix, probe_causality
from moegpt.model import GPT
from moegpt.moe import VARIANTS
from moegpt.presets import resolve_config

runner = CliRunner()


def model_for(variant: str, **moe) -> GPT:
    cfg = resolve_config("tiny", sets=[f"moe.variant={variant}"] + [f"moe.{k}={v}" for k, v in moe.items()])
    torch.manual_seed(0)
    return GPT(cfg.model, cfg.moe).eval()


def tokens(n: int = 512) -> torch.Tensor:
    return torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(0))


def test_perturb_suffix_changes_exactly_the_suffix():
    idx = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    out = perturb_suffix(idx, 4, 50, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :5], idx[:, :5]) and bool((out[:, 5:] != idx[:, 5:]).all())
    assert int(out.max()) < 50


CAUSAL = [name for name, spec in VARIANTS.items() if spec.causal]
NON_CAUSAL = [name for name, spec in VARIANTS.items() if not spec.causal]


@pytest.mark.parametrize("variant,moe", [*[(v, {}) for v in CAUSAL], ("topk", {"capacity_factor": 1.0})])
def test_causal_variants_say_causal(variant, moe):
    result = probe_causality(model_for(variant, **moe), tokens())
    assert result["verdict"] == "causal" and result["causal"]
    suffix = result["suffix_perturbation"]
    assert suffix["max_delta_logits"] <= suffix["tolerance"] and suffix["first_leak"] is None
    agreement = result["cached_agreement"]
    assert agreement["min_top1_agreement"] == 1.0 and agreement["min_set_agreement"] == 1.0


@pytest.mark.parametrize("variant", NON_CAUSAL)
def test_non_causal_variants_leak(variant):
    model = model_for(variant)
    result = probe_causality(model, tokens())
    assert result["verdict"].startswith("leaks (max Δ = ") and not result["causal"]
    suffix = result["suffix_perturbation"]
    assert suffix["max_delta_logits"] > 10 * suffix["tolerance"]
    # the leak starts in the first MoE FFN, not in attention
    assert suffix["first_leak"] == {"module": f"ffn:{variant}", "layer": model.moe_layers[0]}
    assert suffix["per_layer_type"][f"ffn:{variant}"]["source"]
    assert not suffix["per_layer_type"]["attention"]["source"]


def test_expert_choice_routes_differently_when_cached():
    agreement = probe_causality(model_for("expert-choice"), tokens())["cached_agreement"]
    # one cached token is a whole "batch": every expert takes it
    assert agreement["min_set_agreement"] < 1.0


def test_probe_leaves_model_untouched():
    model = model_for("topk")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe_causality(model, tokens())
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_probe_needs_enough_tokens():
    with pytest.raises(MoegptError, match="causality probe"):
        probe_causality(model_for("topk"), tokens(8))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("causality-runs")
    for variant in ("topk", "expert-choice", "soft"):
        result = runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                                     "--set", f"train.runs_root={root}", "--name", variant, "--max-iters", "2",
                                     "--moe", variant])
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("variant,verdict", [("topk", "causal"), ("expert-choice", "leaks"), ("soft", "leaks")])
def test_cli_causality_verdict(trained, variant, verdict):
    result = runner.invoke(app, ["inspect-routing", str(trained / variant), "--tokens", "512", "--causality"])
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.output.splitlines() if x.startswith("causality"))
    assert line.split(": ")[-1].startswith(verdict)
    assert "full forward vs cached generation" in result.output
    report = json.loads(runner.invoke(app, ["inspect-routing", str(trained / variant), "--tokens", "512",
                                            "--causality", "--format", "json"]).stdout)
    assert report["causality"]["verdict"].startswith(verdict)
