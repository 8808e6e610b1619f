"""Benchmarks behind `moegpt bench`: MoE layer vs dense FFN per dispatch backend and whole-model training
throughput (equal-steps quality is in bench_quality.py). Every ratio compares cases measured in the same process, with
repeats interleaved across cases (so a noisy neighbour slows all of them alike) and medians reported.

Legend: N tokens, C (= d) width, E experts, K experts per token, H dense FFN hidden width.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moegpt.config import ModelConfig, MoEConfig, TrainConfig
from moegpt.model import GPT, aux_losses
from moegpt.moe import build_ffn, moe_layer_indices, native
from moegpt.optim import build_optimizer
from moegpt.runtime import autocast
from moegpt.threads import wait_policy


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_wait_policy": wait_policy(),
            "python": platform.python_version()}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if (kernel := native.status(device)) is not None:
        info["native_kernel"] = kernel
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(cases: dict[str, Callable[[], None]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds of every run per case; each repeat (round) runs every case once, so drift hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(cases: dict[str, Callable[[], None]], repeats: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median seconds per case, measured by `interleaved_times`."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(cases, repeats, warmup, device).items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i]: a ratio of runs made seconds apart, steadier on a
    shared machine than the ratio of two medians (a slow spell inflates both runs of its round alike)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant figures: a slow run on a busy machine still reports a positive rate
    (rounding to fixed decimals turned 0.04 GF/s into 0.0)."""
    return float(f"{value:.{digits}g}")


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                       repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = interleaved_medians({"mm": lambda: torch.mm(a, b)}, repeats, 2, device)["mm"]
    return 2 * size**3 / seconds / 1e9


# Tokens per step (batch 1) at which `fixed_cost_per_moe_layer` measures: too few for the matmuls to matter,
# yet enough that a 64-expert top-8 layer still runs most of its experts' blocks (two rows each on average).
FIXED_COST_TOKENS = 16


@dataclass
class LayerCase:
    n_tokens: int
    d_model: int
    n_expert: int
    top_k: int


def _ffn_flops(n_tokens: int, d: int, hidden: int, activation: str = "swiglu") -> float:
    """fwd+bwd FLOPs of the expert matmuls for N tokens through MLP(s) of total active hidden width."""
    mats = 3 if activation == "swiglu" else 2
    return 6.0 * n_tokens * mats * d * hidden


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward during fn() (distinct storages), plus the output."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()) + out.numel() * out.element_size()


def _layer_timings(case: LayerCase, backends: list[str], device: torch.device, precision: str, repeats: int,
                   warmup: int, activation: str) -> tuple[dict[str, list[float]], dict[str, int]]:
    """fwd+bwd seconds of every run and saved-activation bytes of the dense FFN and each backend for one case."""
    model_cfg = ModelConfig(n_embd=case.d_model, n_head=1, n_layer=1)
    layers = {"dense": build_ffn(model_cfg, MoEConfig(variant="dense", activation=activation), 0)}
    for backend in backends:
        moe_cfg = MoEConfig(variant="topk", n_expert=case.n_expert, top_k=case.top_k, dispatch=backend,
                            activation=activation)
        torch.manual_seed(0)  # the same router and experts for every backend
        layers[backend] = build_ffn(model_cfg, moe_cfg, 0)
    for layer in layers.values():
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
        layer.to(device)
    x = torch.randn(1, case.n_tokens, case.d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def step(layer: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with autocast(device, precision):
                y, _ = layer(x)
            y.backward(grad)
            x.grad = None
            for p in layer.parameters():
                p.grad = None
        return run

    def forward_only(layer: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with autocast(device, precision):
                return layer(x)[0]
        return run

    times = interleaved_times({name: step(layer) for name, layer in layers.items()}, repeats, warmup, device)
    memory = {name: saved_activation_bytes(forward_only(layer)) for name, layer in layers.items()}
    return times, memory


def bench_layer(cases: list[LayerCase], backends: list[str], device: torch.device, precision: str = "fp32",
                repeats: int = 7, warmup: int = 2, activation: str = "swiglu",
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """fwd+bwd of one MoE layer (topk routing) per backend vs a dense FFN of equal active FLOPs."""
    peak = matmul_peak_gflops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    rows = []
    for case in cases:
        if progress:
            progress(f"N={case.n_tokens} d={case.d_model} E={case.n_expert} k={case.top_k}")
        times, memory = _layer_timings(case, backends, device, precision, repeats, warmup, activation)
        flops = _ffn_flops(case.n_tokens, case.d_model, 4 * case.d_model, activation)
        for name, runs in times.items():
            seconds = statistics.median(runs)
            rows.append({"n_tokens": case.n_tokens, "d_model": case.d_model, "n_expert": case.n_expert,
                         "top_k": case.top_k, "impl": name, "ms": significant(seconds * 1e3),
                         "ratio_to_dense": round(paired_ratio(runs, times["dense"]), 3),
                         "gflops": significant(flops / seconds / 1e9),
                         "frac_of_peak": significant(flops / seconds / 1e9 / peak),
                         "activation_mb": round(memory[name] / 2**20, 2),
                         "memory_ratio_to_dense": round(memory[name] / memory["dense"], 3)})
    return {"machine": machine_info(device), "precision": precision, "matmul_peak_gflops": round(peak, 1),
            "rows": rows}


def _model_step_times(model_cfg: ModelConfig, moe_cfgs: dict[str, MoEConfig], device: torch.device,
                      batch_size: int, steps: int, warmup: int, precision: str,
                      tokens: torch.Tensor | None) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    """Seconds of every training step per model (stepping in turn on the same batch) and parameter counts."""
    gen = torch.Generator().manual_seed(0)
    T = model_cfg.block_size
    if tokens is None:
        tokens = torch.randint(0, model_cfg.vocab_size, (batch_size * (T + 1) * 4,), generator=gen)
    starts = torch.randint(0, len(tokens) - T - 1, (batch_size,), generator=gen)
    x = torch.stack([tokens[s:s + T] for s in starts]).long().to(device)
    y = torch.stack([tokens[s + 1:s + T + 1] for s in starts]).long().to(device)
    runs = {}
    params = {}
    for name, moe_cfg in moe_cfgs.items():
        torch.manual_seed(0)
        model = GPT(model_cfg, moe_cfg).to(device)
        train_cfg = TrainConfig(lr=1e-3)
        optimizer = build_optimizer(model, train_cfg, device)  # what `moegpt train` steps with
        params[name] = model.num_params()

        def run(model: GPT = model, optimizer: torch.optim.Optimizer = optimizer, moe_cfg: MoEConfig = moe_cfg,
                clip: float = train_cfg.grad_clip or float("inf")):
            with autocast(device, precision):
                out = model(x, y)
                loss = out.loss + aux_losses(out.router_stats, moe_cfg)["total"]
            loss.backward()
            # the trainer clips by default; its cost grows with total (not active) parameters
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[name] = run
    return interleaved_times(runs, steps, warmup, device), params


def fixed_cost_per_moe_layer(model_cfg: ModelConfig, moe_cfgs: dict[str, MoEConfig], device: torch.device,
                             steps: int = 10, warmup: int = 3, precision: str = "fp32",
                             n_tokens: int = FIXED_COST_TOKENS) -> dict[str, float | None]:
    """Milliseconds a training step of each model costs beyond the first non-routed model's, per MoE layer,
    at a token count so small that the expert matmuls cost next to nothing: what a MoE layer pays per step
    whatever the batch (router, sort, per-expert blocks, stats, losses, and clip + AdamW over the extra
    expert weights). The median over rounds of the within-round difference; None for non-routed models."""
    tiny_cfg = dataclasses.replace(model_cfg, block_size=min(n_tokens, model_cfg.block_size))
    times, _ = _model_step_times(tiny_cfg, moe_cfgs, device, 1, steps, warmup, precision, None)
    baselines = [name for name, cfg in moe_cfgs.items() if not moe_layer_indices(cfg, model_cfg.n_layer)]
    result: dict[str, float | None] = {}
    for name, cfg in moe_cfgs.items():
        layers = len(moe_layer_indices(cfg, model_cfg.n_layer))
        if not layers or not baselines:
            result[name] = None
            continue
        extra = statistics.median(m - b for m, b in zip(times[name], times[baselines[0]], strict=True))
        result[name] = round(extra * 1e3 / layers, 3)
    return result


def bench_model(model_cfg: ModelConfig, moe_cfgs: dict[str, MoEConfig], device: torch.device,
                batch_size: int = 16, steps: int = 10, warmup: int = 3, precision: str = "fp32",
                tokens: torch.Tensor | None = None, fixed_cost: bool = False) -> dict[str, Any]:
    """Training tokens/s (fwd+bwd+clip+AdamW, as the trainer steps) per model, interleaved step by step on the
    same batches; with fixed_cost, each MoE model's `fixed_cost_per_moe_layer` too."""
    T = model_cfg.block_size
    times, params = _model_step_times(model_cfg, moe_cfgs, device, batch_size, steps, warmup, precision, tokens)
    fixed = (fixed_cost_per_moe_layer(model_cfg, moe_cfgs, device, steps, warmup, precision) if fixed_cost
             else dict.fromkeys(moe_cfgs))
    base = next(iter(times))
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    rows = [{"model": name, "ms_per_step": round(s * 1e3, 2), "tokens_per_s": round(batch_size * T / s, 1),
             "ratio_to_first": round(paired_ratio(times[base], times[name]), 3), "total_params": params[name]["total"],
             "active_params": params[name]["active"], "fixed_ms_per_moe_layer": fixed[name]}
            for name, s in medians.items()]
    return {"machine": machine_info(device), "precision": precision, "batch_size": batch_size,
            "block_size": T, "rows": rows}
