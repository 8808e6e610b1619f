"""Routing report maths on a synthetic router with known assignments, on real tiny models, and the JSON schema."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from moegpt.cli.routing_views import render_extras
from moegpt.inspect.history import sparkline, training_history
from moegpt.inspect.report import RoutingAccumulator, build_layer_reports, collect_routing, route_text
from moegpt.inspect.schema import SCHEMA_NAME, SCHEMA_VERSION, report_to_json, validate_report
from moegpt.inspect.stats import coefficient_of_variation, layer_summary, top1_expert
from moegpt.model import GPT
from moegpt.moe import VARIANTS, experts_per_token, variant_spec
from moegpt.moe.stats import RouterStats
from moegpt.presets import resolve_config

# Six tokens, four experts, two choices each. Drops: token 3's 2nd choice, token 4's 1st, both of token 5's.
TOKENS_N = torch.tensor([0, 1, 0, 2, 1, 0])
IDX_NK = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 0], [0, 1], [2, 3]])
DROPPED_NK = torch.tensor([[False, False], [False, False], [False, False], [False, True], [True, False],
                           [True, True]])
PROBS_NE = torch.tensor([[0.60, 0.30, 0.05, 0.05],
                         [0.50, 0.10, 0.30, 0.10],
                         [0.35, 0.45, 0.10, 0.10],
                         [0.30, 0.10, 0.10, 0.50],
                         [0.45, 0.35, 0.10, 0.10],
                         [0.10, 0.10, 0.50, 0.30]])
TOP1_N = [0, 0, 1, 3, 1, -1]  # token 4: its 1st choice was dropped; token 5: both


def synthetic_stats(rows: slice, balance: float, z: float, shift: int = 0) -> RouterStats:
    """The synthetic router, optionally with every expert id shifted by `shift` (mod 4)."""
    idx_NK, probs_NE = (IDX_NK[rows] + shift) % 4, PROBS_NE[rows].roll(shift, dims=1)
    return RouterStats(balance=torch.tensor(balance), z=torch.tensor(z), seq_balance=torch.tensor(0.0), n_expert=4,
                       expert_idx_NK=idx_NK, expert_weight_NK=probs_NE.gather(1, idx_NK),
                       dropped_NK=DROPPED_NK[rows], router_probs_NE=probs_NE, router_logits_NE=probs_NE.log())


@pytest.fixture()
def synthetic_report() -> dict:
    """Two MoE layers (1 and 2; layer 0 dense), fed in two batches of three tokens. Layer 2's first choice
    is layer 1's shifted by one expert, so it is perfectly predictable from layer 1."""
    acc = RoutingAccumulator([1, 2], n_expert=4, vocab_size=3)
    for rows, balance, z in ((slice(0, 3), 1.0, 2.0), (slice(3, 6), 2.0, 4.0)):
        acc.update([RouterStats.empty(), synthetic_stats(rows, balance, z), synthetic_stats(rows, balance, z, 1)],
                   TOKENS_N[rows])
    return build_layer_reports(acc, [], dead_threshold=0.7, decode=lambda i: "abc"[i], min_count=1)


def test_synthetic_counts_loads_and_drops(synthetic_report):
    layer = synthetic_report["layers"][0]
    assert layer["layer"] == 1 and layer["tokens"] == 6
    assert layer["counts_before_drops"] == [5, 3, 2, 2]
    assert layer["counts_after_drops"] == [3, 3, 1, 1]
    # counts sum to tokens x k minus drops
    assert layer["assignments"] == 6 * 2 and layer["dropped"] == 4 and layer["kept"] == 6 * 2 - 4
    assert layer["load_before_drops"] == pytest.approx([5 / 12, 3 / 12, 2 / 12, 2 / 12], abs=1e-6)
    assert layer["load_after_drops"] == pytest.approx([3 / 8, 3 / 8, 1 / 8, 1 / 8], abs=1e-6)
    assert layer["max_mean_load"] == pytest.approx((5 / 12) / (1 / 4), abs=1e-4)
    assert layer["cv_load"] == pytest.approx(math.sqrt(1.5) / 3, abs=1e-4)
    assert layer["drop_rate"] == pytest.approx(4 / 12, abs=1e-6)
    assert layer["unrouted_token_frac"] == pytest.approx(1 / 6, abs=1e-6)  # token 5 lost both choices
    assert layer["experts_per_token"] == pytest.approx(8 / 6, abs=1e-4)
    assert layer["dead_experts"] == [2, 3]  # 2/12 < 0.7 / 4
    # top-1 = largest combine weight among kept choices: token 4 -> its kept 2nd choice, token 5 -> none
    assert layer["top1_load"] == pytest.approx([2 / 5, 2 / 5, 0.0, 1 / 5], abs=1e-6)
    # losses: per-batch means averaged with token weights
    assert layer["balance_loss"] == pytest.approx(1.5) and layer["z_loss"] == pytest.approx(3.0)


def test_synthetic_entropy_margin_and_probs(synthetic_report):
    layer = synthetic_report["layers"][0]
    p = PROBS_NE.double()
    entropy = float((-(p * p.log()).sum(-1)).mean()) / math.log(4)
    assert layer["router_entropy"] == pytest.approx(entropy, abs=1e-6)
    assert layer["top1_top2_margin"] == pytest.approx((0.3 + 0.2 + 0.1 + 0.2 + 0.1 + 0.2) / 6, abs=1e-6)
    assert layer["mean_router_prob"] == pytest.approx(p.mean(0).tolist(), abs=1e-6)


def test_synthetic_coactivation(synthetic_report):
    co = synthetic_report["layers"][0]["coactivation"]
    top = co["pairs"][0]
    assert top["experts"] == [0, 1] and top["count"] == 3  # tokens 0, 2 and 4
    assert top["token_frac"] == pytest.approx(0.5)
    assert top["lift"] == pytest.approx(0.5 / ((5 / 6) * (3 / 6)), abs=1e-4)
    counts = {tuple(p["experts"]): p["count"] for p in co["pairs"]}
    assert counts == {(0, 1): 3, (0, 2): 1, (0, 3): 1, (2, 3): 1, (1, 2): 0}
    matrix = co["matrix"]
    assert [matrix[i][i] for i in range(4)] == [5, 3, 2, 2] and matrix[0][1] == matrix[1][0] == 3


def test_synthetic_specialisation_lift(synthetic_report):
    spec = synthetic_report["layers"][0]["specialisation"]
    expert0 = spec[0]["tokens"]
    # lift(v, e) = count(v, e) * N / (count(v) * assignments(e)): b -> 2*6/(2*5), c -> 1*6/(1*5), a -> 2*6/(3*5)
    assert [t["text"] for t in expert0] == ["b", "c", "a"]  # tie in lift: the more frequent token first
    assert [t["lift"] for t in expert0] == pytest.approx([1.2, 1.2, 0.8], abs=1e-4)
    assert [t["count"] for t in expert0] == [2, 1, 2]
    assert expert0[0]["share"] == pytest.approx(1.0)  # both occurrences of b chose expert 0
    assert spec[3]["tokens"][0] == {"id": 2, "text": "c", "count": 1, "share": 1.0, "lift": 3.0}


def test_synthetic_cross_layer(synthetic_report):
    (cross,) = synthetic_report["cross_layer"]
    assert (cross["from_layer"], cross["to_layer"]) == (1, 2)
    assert cross["agreement"] == 1.0 and cross["predictability"] == pytest.approx(1.0)
    assert cross["baseline"] == pytest.approx(2 / 6, abs=1e-4)  # layer 2's most common top-1: experts 1, 2 twice
    shifted = synthetic_report["layers"][1]
    assert shifted["counts_before_drops"] == [2, 5, 3, 2] and shifted["top1_load"][1] == pytest.approx(0.4)


def test_top1_expert_and_trainer_summary_unchanged():
    stats = synthetic_stats(slice(0, 6), 1.0, 1.0)
    assert top1_expert(stats).tolist() == TOP1_N
    # expert-choice style padding: a token with no expert is -1
    padded = RouterStats(balance=torch.tensor(0.0), z=torch.tensor(0.0), seq_balance=torch.tensor(0.0), n_expert=4,
                         expert_idx_NK=torch.tensor([[-1, 1, -1, 3], [-1, -1, -1, -1]]),
                         expert_weight_NK=torch.tensor([[0.0, 0.2, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0]]),
                         router_probs_NE=torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    assert top1_expert(padded).tolist() == [3, -1]
    summary = layer_summary(stats)  # the trainer's log record keeps its keys and meaning
    assert set(summary) == {"max_mean_load", "drop_frac", "router_entropy"}
    assert summary["drop_frac"] == pytest.approx(4 / 12, abs=1e-4)
    assert coefficient_of_variation(torch.tensor([2.0, 2.0])) == 0.0


def tiny_model(variant: str, **moe) -> GPT:
    sets = [f"moe.variant={variant}"] + [f"moe.{k}={v}" for k, v in moe.items()]
    cfg = resolve_config("tiny", sets=sets)
    torch.manual_seed(0)
    return GPT(cfg.model, cfg.moe).eval()


ROUTED = [name for name, spec in VARIANTS.items() if spec.routed]


@pytest.mark.parametrize("variant,moe", [("topk", {"capacity_factor": 1.0}), *[(v, {}) for v in ROUTED]])
def test_real_model_counts_add_up(variant, moe):
    model = tiny_model(variant, **moe)
    ids = torch.randint(0, model.config.vocab_size, (1000,), generator=torch.Generator().manual_seed(1))
    collected = collect_routing(model, ids.numpy(), batch_size=4, block_size=32)
    assert collected.tokens == 999 and math.isfinite(collected.ce)
    report = build_layer_reports(collected.accumulator, list(variant_spec(variant).report_notes))
    assert [x["layer"] for x in report["layers"]] == model.moe_layers
    for layer in report["layers"]:
        assert sum(layer["counts_before_drops"]) == layer["assignments"]
        assert sum(layer["counts_after_drops"]) == layer["kept"] == layer["assignments"] - layer["dropped"]
        assert sum(layer["load_before_drops"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= layer["router_entropy"] <= 1.0 + 1e-6
        if variant_spec(variant).causal:  # token choice: every token makes exactly its k choices
            k = experts_per_token(model.moe_config, model.config.block_size)
            assert layer["assignments"] == collected.tokens * k
        declared = variant_spec(variant).extra_stats
        assert set(layer["extras"]) == {extra.key for extra in declared}
        assert all(layer["extras"][extra.key] is not None for extra in declared)
        assert layer["notes"] == list(variant_spec(variant).report_notes)
        if variant == "topk" and moe:
            assert layer["dropped"] > 0  # capacity factor 1.0 on a random router overflows somewhere
        if variant == "expert-choice":
            assert layer["dropped"] == 0 and layer["notes"]
        if variant == "shared":
            assert 0.0 < layer["extras"]["shared_output_share"] < 1.0
        if variant == "aux-free":
            assert layer["extras"]["expert_bias"] == [0.0] * 4
        if variant == "basic":
            assert layer["load_before_drops"] == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("variant", [v for v in ROUTED if variant_spec(v).extra_stats])
def test_declared_extras_reach_the_terminal_report(variant):
    model = tiny_model(variant)
    collected = collect_routing(model, torch.arange(200).numpy() % 50, batch_size=2, block_size=32)
    layers = build_layer_reports(collected.accumulator, [])["layers"]
    console = Console(record=True, width=100)
    render_extras(console, variant, layers)
    text = console.export_text()
    for extra in variant_spec(variant).extra_stats:
        assert extra.label in text


def test_route_text_gives_one_expert_per_token():
    model = tiny_model("topk")
    out = route_text(model, list(range(70)), block_size=32)  # three windows
    assert set(out) == set(model.moe_layers)
    assert all(len(v) == 70 and all(0 <= e < 4 for e in v) for v in out.values())


def test_json_schema_round_trip(synthetic_report):
    report = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
              "run": {k: None for k in ("path", "checkpoint", "checkpoint_sha256", "variant", "n_layer", "moe_layers",
                                        "n_expert", "experts_per_token", "capacity_factor", "step", "best_val_ce",
                                        "causal")},
              "data": {"data_dir": "d", "split": "val", "tokens": 6, "block_size": 3, "batch_size": 1, "windows": 2},
              "val_ce": float("nan"), "dead_threshold": 0.7, **synthetic_report,
              "history": None, "causality": None, "text": None, "compare": None}
    text = report_to_json(report)
    back = json.loads(text)
    assert back["val_ce"] is None  # NaN becomes null: strict JSON
    back["val_ce"] = 1.0
    assert validate_report(back) == []
    assert back["layers"] == json.loads(json.dumps(synthetic_report["layers"]))
    broken = json.loads(text)
    broken["val_ce"] = 1.0
    del broken["layers"][0]["drop_rate"]
    broken["schema_version"] = 1
    problems = validate_report(broken)
    assert "layers[0]: missing drop_rate" in problems and any("schema_version" in p for p in problems)


def test_history_and_sparkline(tmp_path):
    records = [{"step": 1, "loss_ce": 3.0, "layers": [{"layer": 0, "max_mean_load": 1.0, "drop_frac": 0.0,
                                                      "router_entropy": 0.9, "balance": 1.0}]},
               {"step": 2, "val_ce": 2.5},
               {"step": 3, "loss_ce": 2.0, "layers": [{"layer": 0, "max_mean_load": 3.0, "drop_frac": 0.1,
                                                      "router_entropy": 0.5, "balance": 1.2}]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{truncated")
    h = training_history(tmp_path)
    assert h["steps"] == [1, 3] and h["val"] == [{"step": 2, "val_ce": 2.5}]
    assert h["layers"][0]["max_mean_load"] == [1.0, 3.0]
    assert training_history(tmp_path / "nope") is None
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert sparkline([None, 1.0]) == " ▁" and len(sparkline(list(range(100)), width=10)) == 10
