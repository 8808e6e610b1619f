"""Expert parallelism at the library level: P processes (gloo, CPU) against one process on the same
global batch. Each launch runs every checked variant, so a test costs one process start-up."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moegpt.config import ModelConfig, MoEConfig, TrainConfig
from moegpt.model import GPT, aux_losses
from moegpt.moe.dispatch import run_experts
from moegpt.moe.expert_parallel import ExpertParallelGroup, expert_parallel_forward, shard_bank
from moegpt.moe.experts import ExpertBank
from moegpt.optim import build_optimizer
from moegpt.parallel import ExpertParallel
from moegpt.runtime import run_spawned_rank

# "aux-free@mla": the DeepSeek-shaped trunk (llama, MLA) around aux-free layers: sharding touches only experts
VARIANTS = ("topk", "switch", "shared", "aux-free", "aux-free@mla")
STEPS = 10
PER_RANK_BATCH = 2


def _configs(case: str) -> tuple[ModelConfig, MoEConfig]:
    variant, _, trunk = case.partition("@")
    model = ModelConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16)
    if trunk == "mla":
        model = ModelConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16, arch="llama",
                            attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    # large coefficients so router losses weigh in the gradients being compared
    moe = MoEConfig(variant=variant, n_expert=4, top_k=2, balance_coef=0.1, z_coef=0.01, seq_balance_coef=0.1,
                    bias_update_rate=0.05, capacity_factor=1.0 if variant == "switch" else 0.0)
    return model, moe


def _step(model, moe_cfg, x, y) -> tuple[torch.Tensor, torch.Tensor, int]:
    out = model(x, y)
    aux = aux_losses(out.router_stats, moe_cfg)
    (out.loss + aux["total"]).backward()
    dropped = sum(int(s.dropped_NK.sum()) for s in out.router_stats if s.dropped_NK is not None)
    return out.loss.detach(), aux["total"].detach(), dropped


def _full_grads(model, ep: ExpertParallel | None) -> dict[str, torch.Tensor]:
    if ep is None:
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    return {n: ep._gather(p.grad) if n in ep.expert_params else p.grad.clone() for n, p in model.named_parameters()}


def _compare_variant(variant: str, rank: int, world: int, ep_size: int) -> dict[str, float]:
    model_cfg, moe_cfg = _configs(variant)
    torch.manual_seed(0)
    ref = GPT(model_cfg, moe_cfg)
    sharded = copy.deepcopy(ref)
    ep = ExpertParallel(sharded, ep_size, world, rank)
    train_cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    opts = [build_optimizer(m, train_cfg, torch.device("cpu")) for m in (ref, sharded)]
    gen = torch.Generator().manual_seed(1)
    worst = {"loss": 0.0, "grad": 0.0, "grad_norm": 0.0, "dropped": 0.0}
    for _ in range(STEPS):
        xy = torch.randint(model_cfg.vocab_size, (world * PER_RANK_BATCH, model_cfg.block_size + 1), generator=gen)
        x, y = xy[:, :-1], xy[:, 1:]
        ce, aux, dropped = _step(ref, moe_cfg, x, y)
        worst["dropped"] += dropped
        ce_ep, aux_ep, _ = _step(sharded, moe_cfg, ep.local_rows(x), ep.local_rows(y))
        ep.sync_gradients()
        loss_ep = ep.mean_over_ranks(float(ce_ep)) + float(aux_ep)
        worst["loss"] = max(worst["loss"], abs(loss_ep - float(ce + aux)))
        ref_grads, ep_grads = _full_grads(ref, None), _full_grads(sharded, ep)
        worst["grad"] = max(worst["grad"], max(float((ref_grads[n] - ep_grads[n]).abs().max()) for n in ref_grads))
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        worst["grad_norm"] = max(worst["grad_norm"], abs(float(norm) - float(ep.clip_grad_norm_(1.0))))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for layer_ref, layer_ep in zip(_aux_free(ref), _aux_free(sharded), strict=True):
            dist.all_reduce(layer_ep.pending_load)
            layer_ref.update_bias()
            layer_ep.update_bias()
    full = ep.full_model_state()
    worst["weights"] = max(float((v - full[k]).abs().max()) for k, v in ref.state_dict().items())
    local_counts = [p.shape[0] for n, p in sharded.named_parameters() if n in ep.expert_params]
    worst["experts_sharded"] = float(bool(local_counts) and set(local_counts) == {moe_cfg.n_expert // ep_size})
    worst["in_sync"] = float(ep.in_sync())
    return worst


def _compare_one_sided_layer(rank: int, world: int) -> dict[str, float]:
    """Every choice goes to rank 0's experts (some empty): rank 1 receives no rows, yet forward and
    backward meet in the same collectives and equal one process on all ranks' tokens."""
    torch.manual_seed(0)
    bank = ExpertBank(4, 8, 6, "swiglu")
    torch.nn.init.normal_(bank.w_in, std=0.3)
    torch.nn.init.normal_(bank.w_out, std=0.3)
    sharded = copy.deepcopy(bank)
    group = ExpertParallelGroup(group=None, rank=rank, size=world, world_group=None, world_size=world)
    shard_bank(sharded, group)
    n = 5
    x_all = torch.randn(world * n, 8, requires_grad=True)
    idx_all = torch.randint(0, 2, (world * n, 2))
    idx_all[::3, 1] = -1
    w_all = torch.rand(world * n, 2, requires_grad=True)
    y_ref = run_experts(x_all, idx_all, w_all, bank, "sorted")
    (y_ref.square().sum()).backward()
    rows = slice(rank * n, (rank + 1) * n)
    x, w = x_all.detach()[rows].clone().requires_grad_(), w_all.detach()[rows].clone().requires_grad_()
    y = expert_parallel_forward(x, idx_all[rows], w, sharded, "sorted", group)
    y.square().sum().backward()
    experts = slice(rank * 2, rank * 2 + 2)
    return {"y": float((y - y_ref[rows]).abs().max()), "x_grad": float((x.grad - x_all.grad[rows]).abs().max()),
            "w_grad": float((w.grad - w_all.grad[rows]).abs().max()),
            "expert_grad": 0.0 if sharded.w_in.grad is None else
            float((sharded.w_in.grad - bank.w_in.grad[experts]).abs().max())}


def _noisy_topk_trains_and_evaluates_like_one_process(rank: int, world: int) -> dict[str, float]:
    """noisy-topk draws its training noise per rank (no equivalence to check there): its replicas must
    stay in sync while training, and without noise (eval) its loss must equal one process's."""
    model_cfg, moe_cfg = _configs("noisy-topk")
    torch.manual_seed(0)
    ref = GPT(model_cfg, moe_cfg)
    sharded = copy.deepcopy(ref)
    ep = ExpertParallel(sharded, world, world, rank)
    opt = build_optimizer(sharded, TrainConfig(lr=1e-3), torch.device("cpu"))
    xy = torch.randint(model_cfg.vocab_size, (world * PER_RANK_BATCH, model_cfg.block_size + 1),
                       generator=torch.Generator().manual_seed(2))
    x, y = xy[:, :-1], xy[:, 1:]
    for _ in range(3):
        _step(sharded, moe_cfg, ep.local_rows(x), ep.local_rows(y))
        ep.sync_gradients()
        ep.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref.load_state_dict(ep.full_model_state())
    ref.eval()
    sharded.eval()
    with torch.no_grad():
        eval_ref = float(ref(x, y).loss)
        eval_ep = ep.mean_over_ranks(float(sharded(ep.local_rows(x), ep.local_rows(y)).loss))
    return {"out_of_sync": float(not ep.in_sync()), "eval_loss": abs(eval_ref - eval_ep)}


def _aux_free(model) -> list:
    return [m for m in model.modules() if hasattr(m, "update_bias")]


def _worker(rank: int, world: int, ep_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    run_spawned_rank(lambda: torch.save(_rank_results(rank, world, ep_size), os.path.join(out_dir, f"rank{rank}.pt")))


def _rank_results(rank: int, world: int, ep_size: int) -> dict:
    results = {v: _compare_variant(v, rank, world, ep_size) for v in VARIANTS}
    if world == ep_size:
        results["one-sided layer"] = _compare_one_sided_layer(rank, world)
        results["noisy-topk"] = _noisy_topk_trains_and_evaluates_like_one_process(rank, world)
    return results


def _launch(tmp_path, world: int, ep_size: int) -> list[dict]:
    mp.spawn(_worker, args=(world, ep_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _check(results: list[dict]) -> None:
    for rank, per_variant in enumerate(results):
        for check in ("one-sided layer", "noisy-topk"):
            worst = per_variant.pop(check, None)
            assert worst is None or max(worst.values()) <= 1e-5, (rank, check, worst)
        for variant, worst in per_variant.items():
            where = f"rank {rank} {variant}"
            assert worst["loss"] <= 1e-5, (where, worst)
            assert worst["grad"] <= 1e-5, (where, worst)  # every parameter, expert weights included
            assert worst["grad_norm"] <= 1e-5, (where, worst)
            assert worst["weights"] <= 1e-5, (where, worst)
            assert worst["experts_sharded"] == 1.0 and worst["in_sync"] == 1.0, (where, worst)
            # capacity is global: switch drops choices here, and the sharded run drops exactly the same ones
            assert (worst["dropped"] > 0) == (variant == "switch"), (where, worst)


@pytest.mark.slow
def test_two_expert_parallel_ranks_match_one_process(tmp_path):
    _check(_launch(tmp_path, world=2, ep_size=2))


@pytest.mark.slow
def test_expert_and_data_parallel_four_ranks_match_one_process(tmp_path):
    _check(_launch(tmp_path, world=4, ep_size=2))
