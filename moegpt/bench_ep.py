"""`moegpt bench ep`: training throughput at expert-parallel sizes P, with the all-to-all's cost.

Each P > 1 runs in its own group of P processes (a process group cannot change size), started here with
torch.multiprocessing and a file rendezvous (P = 1 runs in this process), so sizes cannot be interleaved
step by step inside one process as the other benchmarks are; instead every size runs once per round,
rounds alternate sizes, and medians over rounds are reported (ratio_to_first: the median over rounds of
the first size's step time over this size's, within a round). Every process gets threads // P intra-op
threads (at least one; threads: this process's torch.get_num_threads()), so all sizes use the same cores
where they can. Steps are the trainer's (forward, backward, gradient sums, clip, AdamW) on the same
global batch at every P.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moegpt.bench import machine_info, paired_ratio
from moegpt.config import RunConfig
from moegpt.model import GPT, aux_losses
from moegpt.optim import build_optimizer
from moegpt.parallel import ExpertParallel, check_expert_parallel_run
from moegpt.runtime import run_spawned_rank


def bench_expert_parallel(cfg: RunConfig, sizes: list[int], steps: int, rounds: int, warmup: int = 2,
                          device: str = "cpu") -> dict[str, Any]:
    for p in sizes:
        cfg.train.expert_parallel = p
        check_expert_parallel_run(cfg, world_size=p)
    samples: dict[int, list[dict[str, float]]] = {p: [] for p in sizes}
    for _ in range(rounds):
        for p in sizes:
            samples[p].append(_launch(cfg, p, steps, warmup, device))
    base = [s["step_s"] for s in samples[sizes[0]]]
    tokens = cfg.train.batch_size * cfg.model.block_size
    rows = []
    for p in sizes:
        step_s = statistics.median(s["step_s"] for s in samples[p])
        spread = [round(f(s["step_s"] for s in samples[p]) * 1e3, 2) for f in (min, max)]
        rows.append({"P": p, "threads_per_process": max(1, torch.get_num_threads() // p),
                     "ms_per_step": round(step_s * 1e3, 2), "ms_per_step_range": spread,
                     "tokens_per_s": round(tokens / step_s, 1),
                     "ratio_to_first": round(paired_ratio(base, [s["step_s"] for s in samples[p]]), 3),
                     "exchange_share": round(statistics.median(s["exchange_share"] for s in samples[p]), 3),
                     "bytes_per_step": int(statistics.median(s["bytes_per_step"] for s in samples[p]))})
    return {"machine": machine_info(torch.device(device)), "batch_size": cfg.train.batch_size,
            "block_size": cfg.model.block_size, "n_expert": cfg.moe.n_expert, "variant": cfg.moe.variant,
            "rounds": rounds, "rows": rows}


def _launch(cfg: RunConfig, size: int, steps: int, warmup: int, device: str) -> dict[str, float]:
    if size == 1:  # no process group: this process, with all its threads
        return _measure(cfg, 1, 0, steps, warmup, torch.device(device))
    with tempfile.TemporaryDirectory() as tmp:
        threads = max(1, torch.get_num_threads() // size)
        mp.spawn(_worker, args=(size, threads, cfg.to_dict(), steps, warmup, device, tmp), nprocs=size, join=True)
        return torch.load(Path(tmp) / "result.pt")


def _worker(rank: int, size: int, threads: int, raw_cfg: dict, steps: int, warmup: int, device: str,
            tmp: str) -> None:
    """One rank of a P > 1 run; rank 0 leaves the result in tmp/result.pt for the launching process."""
    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(raw_cfg)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device(device)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{tmp}/store",
                            rank=rank, world_size=size)
    run_spawned_rank(lambda: _measure_to_file(cfg, size, rank, steps, warmup, dev, Path(tmp) / "result.pt"))


def _measure_to_file(cfg: RunConfig, size: int, rank: int, steps: int, warmup: int, dev: torch.device,
                     path: Path) -> None:
    result = _measure(cfg, size, rank, steps, warmup, dev)
    if rank == 0:
        torch.save(result, path)


def _measure(cfg: RunConfig, size: int, rank: int, steps: int, warmup: int, dev: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe).to(dev)
    ep = ExpertParallel(model, size, size, rank) if size > 1 else None
    optimizer = build_optimizer(model, cfg.train, dev)
    gen = torch.Generator().manual_seed(0)
    xy = torch.randint(cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size + 1), generator=gen)
    x, y = xy[:, :-1].to(dev), xy[:, 1:].to(dev)
    if ep:
        x, y = ep.local_rows(x), ep.local_rows(y)
    for _ in range(warmup):
        _train_step(model, optimizer, ep, x, y, cfg)
    if ep:
        ep.meter.reset()
        dist.barrier()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(model, optimizer, ep, x, y, cfg)
    _sync(dev)
    elapsed = time.perf_counter() - start
    if ep is None:
        return {"step_s": elapsed / steps, "exchange_share": 0.0, "bytes_per_step": 0.0}
    sent = torch.tensor([float(ep.meter.bytes_sent)], device=dev)
    dist.all_reduce(sent)  # bytes that crossed between processes, summed over senders
    return {"step_s": elapsed / steps, "exchange_share": ep.meter.seconds / elapsed,
            "bytes_per_step": float(sent) / steps}


def _train_step(model: GPT, optimizer: torch.optim.Optimizer, ep: ExpertParallel | None, x, y,
                cfg: RunConfig) -> None:
    out = model(x, y)
    (out.loss + aux_losses(out.router_stats, cfg.moe)["total"]).backward()
    clip = cfg.train.grad_clip or float("inf")
    if ep:
        ep.sync_gradients()
        ep.clip_grad_norm_(clip)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
