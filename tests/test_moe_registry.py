"""The variant registry (moegpt/moe/registry.py, spec.py): what the rest of moegpt asks a variant, and the
defects that scattered per-variant rules used to cause (each test here failed before the VariantSpec)."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, train_tiny
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.config import ModelConfig, MoEConfig
from moegpt.generate import LayerRouting
from moegpt.inspect.stats import top1_expert
from moegpt.moe import (
    BACKENDS,
    VARIANTS,
    capacity_factor,
    experts_per_token,
    layer_facts,
    register,
    variant_problems,
    variant_spec,
)
from moegpt.moe.stats import RouterStats

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
MODEL = ModelConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64)


# ---- capacity: one meaning ---------------------------------------------------------------------------

def test_switch_defaults_to_capacity_1_25_and_zero_means_dropless():
    assert capacity_factor(MoEConfig(variant="switch")) == 1.25
    assert capacity_factor(MoEConfig(variant="switch", capacity_factor=0.0)) == 0.0
    assert capacity_factor(MoEConfig(variant="topk")) == 0.0
    assert capacity_factor(MoEConfig(variant="expert-choice")) == 1.0
    assert capacity_factor(MoEConfig(variant="basic", capacity_factor=2.0)) == 0.0  # nothing to drop


def test_switch_runs_dropless_when_asked():
    torch.manual_seed(0)
    layer = VARIANTS["switch"].layer(MODEL, MoEConfig(variant="switch", n_expert=4, capacity_factor=0.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # every token prefers expert 0: any capacity would overflow
    _, stats = layer(torch.randn(2, 8, 32).abs())
    assert stats.dropped_NK is None or not bool(stats.dropped_NK.any())
    capped = VARIANTS["switch"].layer(MODEL, MoEConfig(variant="switch", n_expert=4))
    capped.load_state_dict(layer.state_dict())
    assert bool(capped(torch.randn(2, 8, 32).abs())[1].dropped_NK.any())


# ---- experts per token: one answer everywhere --------------------------------------------------------

@pytest.mark.parametrize("variant,expected", [("switch", 1.0), ("basic", 4.0), ("topk", 2.0), ("dense", 1.0),
                                              ("expert-choice", 2.0), ("soft", 4 / 16)])
def test_experts_per_token_comes_from_the_variant(variant, expected):
    moe = MoEConfig(variant=variant, n_expert=4, top_k=2)
    assert experts_per_token(moe, MODEL.block_size) == pytest.approx(expected)
    assert layer_facts(MODEL, moe)["experts_per_token"] == pytest.approx(expected, abs=1e-4)


def test_train_banner_params_and_inspect_print_the_effective_k(tiny_data, tmp_path):
    banner = train_tiny(tiny_data, tmp_path, "sw", "--moe", "switch")
    assert banner.exit_code == 0, banner.output
    assert "switch E=4 k=1 capacity=1.25" in banner.output
    basic = train_tiny(tiny_data, tmp_path, "basic", "--moe", "basic")
    assert "basic E=4 k=4 " in basic.output
    report = json.loads(runner.invoke(app, ["inspect-routing", str(tmp_path / "basic"), "--format", "json",
                                            "--tokens", "256"]).stdout)
    assert report["run"]["experts_per_token"] == 4
    params = runner.invoke(app, ["params", "--preset", "tiny", "--moe", "switch"]).output
    assert re.search(r"experts / per token\s+│\s+4 / 1\b", params), params


# ---- one top-1 definition, one palette ---------------------------------------------------------------

def test_sample_and_inspect_agree_on_a_dropped_first_choice():
    # token 0's preferred expert (2) was dropped for capacity: the token got only expert 1's output
    idx = torch.tensor([[2, 1], [0, 3]])
    weight = torch.tensor([[0.0, 0.3], [0.6, 0.4]])
    dropped = torch.tensor([[True, False], [False, False]])
    stats = RouterStats(balance=torch.tensor(0.0), z=torch.tensor(0.0), seq_balance=torch.tensor(0.0), n_expert=4,
                        expert_idx_NK=idx, expert_weight_NK=weight, dropped_NK=dropped,
                        router_probs_NE=torch.tensor([[0.1, 0.3, 0.5, 0.1], [0.5, 0.1, 0.1, 0.3]]))
    inspect_top1 = top1_expert(stats).tolist()
    sample_top1 = LayerRouting(idx[None], weight[None], dropped[None]).top1_BT()[0].tolist()
    assert inspect_top1 == sample_top1 == [1, 0]


def test_one_palette_for_sample_and_inspect():
    from moegpt.cli import palette, routing_views, sample

    assert sample.token_style is routing_views.token_style is palette.token_style
    assert not hasattr(sample, "PALETTE")


# ---- the CLI's lists come from one place -------------------------------------------------------------

def test_dispatch_help_lists_every_backend():
    text = " ".join(runner.invoke(app, ["train", "--help"], terminal_width=400).output.split())
    for backend in BACKENDS:
        assert backend in text


def test_variants_command_lists_every_registered_variant():
    text = runner.invoke(app, ["variants"], terminal_width=200).output
    for name in VARIANTS:
        assert name in text


def test_registering_a_name_twice_is_refused():
    spec = variant_spec("topk")
    assert register(spec) is spec  # the same spec again is a no-op
    with pytest.raises(Exception, match="already registered"):
        register(type(spec)(**{**spec.__dict__, "description": "another"}))


def test_unknown_variant_is_one_line(tiny_data, tmp_path):
    result = train_tiny(tiny_data, tmp_path, "x", "--moe", "nope")
    assert_one_line_error(result, "unknown MoE variant 'nope'")
    assert "nope" in " ".join(variant_problems(MoEConfig(variant="nope")))


# ---- a variant outside moegpt/moe/ ---------------------------------------------------------------------

def test_a_test_only_variant_trains_and_reports_through_the_cli(tiny_data, tmp_path):
    """tests/toy_variant.py is registered by conftest.py with one line: train and inspect know it."""
    result = train_tiny(tiny_data, tmp_path, "toy", "--moe", "test-sigmoid-topk")
    assert result.exit_code == 0, result.output
    table = runner.invoke(app, ["inspect-routing", str(tmp_path / "toy"), "--tokens", "256"])
    assert table.exit_code == 0, table.output
    assert "mean top-1 gate" in table.output and "registered by the test suite" in table.output


def test_nothing_outside_moe_branches_on_a_variant_name():
    names = [name for name in VARIANTS if name != "test-sigmoid-topk"]
    offenders = []
    for path in [*(ROOT / "moegpt").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        if ROOT / "moegpt" / "moe" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in names
                                                     for c in [node.left, *node.comparators]):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# ---- packaging -----------------------------------------------------------------------------------------

STDLIB_ADDED = {"tomllib": (3, 11), "graphlib": (3, 9), "zoneinfo": (3, 9)}


def test_declared_minimum_python_has_every_stdlib_module_the_package_imports():
    text = (ROOT / "pyproject.toml").read_text()
    minimum = tuple(int(x) for x in re.search(r'requires-python = ">=(\d+)\.(\d+)"', text).groups())
    target = re.search(r'target-version = "py(\d)(\d+)"', text).groups()
    assert tuple(int(x) for x in target) == minimum  # ruff checks syntax for the same version
    assert sys.version_info[:2] >= minimum
    too_new = []
    for path in [*(ROOT / "moegpt").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for module in modules:
                added = STDLIB_ADDED.get(module.split(".")[0])
                if added and added > minimum:
                    too_new.append(f"{path.name}: {module} needs Python {added}")
    assert too_new == []
