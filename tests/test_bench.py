"""`moegpt bench`: every subcommand runs end to end on a tiny grid and emits well-formed JSON.

No timing assertions: the numbers are machine-dependent; only their shape and sanity are checked.
"""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from moegpt.bench import interleaved_times, paired_ratio, significant
from moegpt.cli.main import app

runner = CliRunner()


def run_json(args: list[str]) -> dict:
    result = runner.invoke(app, ["bench", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # round 2 ran in a slow spell for both cases: the paired ratio ignores it, a ratio of medians would not
    assert paired_ratio([2.0, 40.0, 6.0], [1.0, 20.0, 2.0]) == 2.0
    assert paired_ratio([1.0, 3.0], [1.0, 1.0]) == 2.0  # even count: mean of the middle two


def test_interleaved_times_runs_every_case_once_per_round():
    order: list[str] = []
    times = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3,
                              warmup=1, device=torch.device("cpu"))
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up, then rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_significant_keeps_small_rates_positive():
    assert significant(0.0412345) == 0.04123 and significant(1234.5678) == 1235.0 and significant(0.0) == 0.0


def test_bench_layer_json():
    out = run_json(["layer", "--tokens", "256", "--d-model", "32", "--grid", "4x1,4x2", "--repeats", "1",
                    "--backends", "sorted,bucketed,loop", "--device", "cpu"])
    assert {"machine", "precision", "matmul_peak_gflops", "rows"} <= set(out)
    assert {"torch", "threads", "cpu"} <= set(out["machine"])
    assert len(out["rows"]) == 2 * 4  # two cases x (dense + three backends)
    for row in out["rows"]:
        assert row["ms"] > 0 and row["gflops"] > 0 and row["memory_ratio_to_dense"] > 0
        if row["impl"] == "dense":
            assert row["ratio_to_dense"] == 1.0


def test_bench_model_json_both_precisions():
    out = run_json(["model", "--preset", "tiny", "--steps", "1", "--variants", "dense,topk", "--precision", "both",
                    "--device", "cpu"])
    names = [row["model"] for row in out["rows"]]
    assert names == ["dense fp32", "topk fp32", "dense bf16", "topk bf16"]
    assert out["rows"][0]["ratio_to_first"] == 1.0
    dense, topk = out["rows"][0], out["rows"][1]
    assert topk["total_params"] > dense["total_params"]
    assert abs(topk["active_params"] - dense["active_params"]) / dense["active_params"] < 0.02


def test_bench_sample_json():
    out = run_json(["sample", "--preset", "tiny", "--new-tokens", "8", "--repeats", "1", "--device", "cpu"])
    assert [row["mode"] for row in out["rows"]] == ["kv-cache", "recompute", "recompute-crop"]
    assert out["speedup"] > 0 and all(row["tokens_per_s"] > 0 for row in out["rows"])
    assert out["rows"][0]["kv_cache_speedup"] == 1.0 and out["rows"][1]["kv_cache_speedup"] == out["speedup"]
    assert out["speedup_best"] > 0
    assert out["same_tokens"] is True
    assert out["decode_ops_per_token"] > 0


def test_bench_bad_input_is_one_line():
    for args in (["layer", "--grid", "4x9"], ["layer", "--backends", "warp"], ["model", "--variants", "nope"],
                 ["layer", "--format", "yaml"]):
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moegpt: error:"), result.stderr


def test_bad_bench_option_is_one_line_naming_the_full_command():
    result = runner.invoke(app, ["bench", "sample", "--repeats", "0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error: ")
    assert "'moegpt bench sample --help'" in lines[0]


def test_bench_sample_attention_json_reports_cache_memory_for_mha_and_mla():
    out = run_json(["sample", "--preset", "deepseek", "--attention", "mha,mla", "--new-tokens", "4",
                    "--repeats", "1", "--device", "cpu"])
    rows = {row["attention"]: row for row in out["rows"]}
    assert list(rows) == ["mha", "mla-absorbed", "mla-plain"]
    assert rows["mha"]["cache_bytes_per_token"] == 4 * 4 * 2 * 128
    assert rows["mla-absorbed"]["cache_bytes_per_token"] == rows["mla-plain"]["cache_bytes_per_token"] == 4 * 4 * 80
    for row in rows.values():  # a full cache: block_size tokens, measured on the real buffers
        assert row["cache_bytes_full_context"] == 128 * row["cache_bytes_per_token"]
        assert row["tokens_per_s"] > 0
    assert rows["mha"]["ratio_to_first"] == 1.0
    assert out["mla_absorbed_same_tokens_as_plain"] is True


def test_bench_sample_bad_attention_is_one_line():
    result = runner.invoke(app, ["bench", "sample", "--attention", "gqa"])
    assert result.exit_code == 2 and result.stderr.startswith("moegpt: error: --attention: unknown attention")
    assert len(result.stderr.strip().splitlines()) == 1
def test_tables_fit_100_columns_unless_wide(capsys):
    from moegpt.cli.bench import render

    machine = {"cpu": "Intel(R) Xeon(R) Platinum 8488C", "torch": "2.13.0", "threads": 2,
               "omp_wait_policy": "short spin"}
    row = {"n_tokens": 8192, "d_model": 256, "n_expert": 64, "top_k": 8, "impl": "bucketed", "ms": 123.45,
           "ratio_to_dense": 1.234, "gflops": 123.4, "frac_of_peak": 0.456, "memory_ratio_to_dense": 0.601}
    columns = list(row)
    result = {"machine": machine, "precision": "fp32", "matmul_peak_gflops": 150.2, "rows": [row]}
    render(result, "table", "moegpt bench layer (fwd+bwd, median)", columns)
    narrow = capsys.readouterr().out
    assert max(len(line) for line in narrow.splitlines()) <= 100 and "x dense" in narrow
    assert "2 threads (short spin wait)" in narrow
    render(result, "table", "moegpt bench layer (fwd+bwd, median)", columns, wide=True)
    assert "memory_ratio_to_dense" in capsys.readouterr().out


def test_bench_model_takes_batch_block_and_activation_and_reports_the_fixed_cost_per_moe_layer():
    out = run_json(["model", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--block-size", "8",
                    "--activation", "gelu", "--device", "cpu"])
    assert (out["batch_size"], out["block_size"]) == (2, 8)
    dense, topk = out["rows"]
    assert dense["fixed_ms_per_moe_layer"] is None and isinstance(topk["fixed_ms_per_moe_layer"], float)
    # GELU experts: one input matrix per expert instead of SwiGLU's two
    swiglu = run_json(["model", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--block-size", "8",
                       "--no-fixed-cost", "--device", "cpu"])
    assert swiglu["rows"][1]["fixed_ms_per_moe_layer"] is None
    assert topk["total_params"] != swiglu["rows"][1]["total_params"]


def test_fixed_cost_is_the_median_extra_step_time_per_moe_layer(monkeypatch):
    from moegpt import bench
    from moegpt.config import ModelConfig, MoEConfig

    times = {"dense": [1.0, 1.0, 9.0], "topk": [1.004, 1.006, 9.1], "half": [1.002, 1.002, 1.002]}
    monkeypatch.setattr(bench, "_model_step_times", lambda *args: (times, {}))
    cfgs = {"dense": MoEConfig(variant="dense"), "topk": MoEConfig(variant="topk"),
            "half": MoEConfig(variant="topk", moe_every=2)}
    fixed = bench.fixed_cost_per_moe_layer(ModelConfig(n_layer=4), cfgs, torch.device("cpu"))
    assert fixed["dense"] is None
    assert fixed["topk"] == round(0.006 * 1e3 / 4, 3)  # median of 4, 6 and 100 ms over 4 MoE layers
    assert fixed["half"] == round(0.002 * 1e3 / 2, 3)  # moe_every=2: two MoE layers of four


def test_bench_model_bad_activation_is_one_line():
    result = runner.invoke(app, ["bench", "model", "--activation", "tanh"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error:") and "tanh" in lines[0]
