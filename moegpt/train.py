"""The training loop. No printing: progress goes to an `on_event(kind, payload)` callback.

loss = cross-entropy + balance_coef * sum_layers balance + z_coef * sum_layers z
       (+ seq_balance_coef * sum_layers seq_balance, for aux-free)
Validation loss is cross-entropy alone. Batches are a pure function of (seed, rank, step, micro
step), so the data position is just the step and a resumed run continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moegpt import __version__
from moegpt.checkpoint import CheckpointManager, load_checkpoint
from moegpt.config import RunConfig
from moegpt.data import TokenDataset, ensure_prepared
from moegpt.errors import MoegptError, TrainingDiverged, TrainingInterrupted
from moegpt.metrics import log_record
from moegpt.model import GPT, aux_losses
from moegpt.moe import layer_facts, native
from moegpt.optim import build_optimizer, lr_at
from moegpt.parallel import ExpertParallel, check_expert_parallel_run
from moegpt.resume import config_differences, keep_decay_horizon
from moegpt.run_dir import resolve_run_dir, truncate_metrics
from moegpt.runlock import RunLock
from moegpt.runtime import autocast, device_for_rank, init_distributed, leave_process_group, resolve_precision
from moegpt.safe_io import append_line
from moegpt.signals import stop_signals_handled

EventCallback = Callable[[str, dict[str, Any]], None]

FAULT_NAN_ENV = "MOEGPT_FAULT_NAN_AT_STEP"  # test hook: make the loss NaN at this (1-based) step


def batch_generator(seed: int, stream: str, rank: int, step: int, micro: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{stream}:{rank}:{step}:{micro}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


@dataclass
class _Run:
    """What one training run holds while it runs: its data, folder, model, optimizer and counters."""

    ds: TokenDataset
    run_dir: Path
    manager: CheckpointManager
    raw_model: GPT  # the module itself (checkpoints, hooks, evaluation)
    model: Any  # what the step calls: raw_model, or its torch.compile / DDP wrapper
    optimizer: torch.optim.Optimizer
    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    last_val: float | None = None
    train_s: float = 0.0  # cumulative training time (no evaluation, no checkpoints), carried across resumes
    wall_s: float = 0.0  # cumulative wall time before this process started
    resumed_from: str | None = None
    params: dict[str, int] = field(default_factory=dict)
    tokens_per_step: int = 0
    start_step: int = 0
    wall_start: float = 0.0
    window_start: float = 0.0
    window_tokens: int = 0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str = "no", on_event: EventCallback | None = None,
                 restore_rng: bool = True):
        if resume not in ("no", "yes", "auto"):
            raise MoegptError(f"resume must be no, yes or auto (got {resume!r})")
        self.cfg, self.resume, self.restore_rng = cfg, resume, restore_rng
        self.on_event = on_event or (lambda kind, payload: None)
        self.dist = init_distributed(cfg.train.device)
        self.device = device_for_rank(self.dist, cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self._signal: int | None = None
        self._fault_nan_step = int(os.environ.get(FAULT_NAN_ENV, "0"))  # test hook, read once
        self._run_lock: RunLock | None = None
        self.ep: ExpertParallel | None = None  # set when the run shards its experts over processes

    def emit(self, kind: str, **payload: Any) -> None:
        if self.dist.is_main:
            self.on_event(kind, payload)

    # ---- setup ----------------------------------------------------------------------------------
    def _load_data(self) -> TokenDataset:
        data_dir = Path(self.cfg.data.data_root) / self.cfg.data.name
        if not (data_dir / "meta.json").exists() and self.cfg.data.name == "stdlib":
            if self.dist.is_main:
                self.emit("prepare", data_dir=str(data_dir))
                ensure_prepared(self.cfg.data.data_root, "stdlib")
            if self.dist.enabled:
                dist.barrier()
        ds = TokenDataset(data_dir)
        need = self.cfg.model.block_size + 1
        for split in ("train", "val"):
            if ds.num_tokens(split) < need:
                raise MoegptError(f"block_size {self.cfg.model.block_size} is larger than the data can serve: "
                                  f"{split} split of {data_dir} has {ds.num_tokens(split)} tokens")
        self.cfg.model.vocab_size = ds.vocab_size  # the data decides the vocabulary
        return ds

    def _locked_run_dir(self) -> Path:
        """The run folder, locked by rank 0 before anything in it is read or touched."""
        t = self.cfg.train
        if self.dist.is_main and t.name:
            self._run_lock = RunLock.acquire(Path(t.runs_root) / t.name)
        run_dir = resolve_run_dir(self.cfg, self.resume)
        if self.dist.is_main and self._run_lock is None:
            self._run_lock = RunLock.acquire(run_dir)
        return run_dir

    # ---- main loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with self._signal_handlers():
            try:
                summary = self._run()
            except BaseException:
                with contextlib.suppress(Exception):  # the original error is the one to report
                    self._leave_process_group(clean=False)
                raise
            finally:
                if self._run_lock is not None:
                    self._run_lock.release()
            self._leave_process_group(clean=True)
            return summary

    def _leave_process_group(self, clean: bool) -> None:
        if self.dist.enabled:
            leave_process_group(clean)

    def _run(self) -> dict[str, Any]:
        run = self._open_run()
        self._restore(run)
        self._start(run)
        while run.step < self.cfg.train.max_iters:
            lr, out, aux, grad_norm = self._train_step(run)
            self._after_step(run, lr, out, aux, grad_norm)
        return self._finish(run)

    def _open_run(self) -> _Run:
        """Data, the locked run folder, the model (sharded under expert parallelism) and its optimizer."""
        cfg, t = self.cfg, self.cfg.train
        check_expert_parallel_run(cfg, self.dist.world_size)
        ds = self._load_data()
        run_dir = self._locked_run_dir()
        cfg.train.name = run_dir.name
        torch.manual_seed(t.seed)
        model = GPT(cfg.model, cfg.moe).to(self.device)
        if t.expert_parallel > 1:
            self.ep = ExpertParallel(model, t.expert_parallel, self.dist.world_size, self.dist.rank)
        return _Run(ds=ds, run_dir=run_dir, manager=CheckpointManager(run_dir, keep=t.keep_ckpts),
                    raw_model=model, model=model, optimizer=build_optimizer(model, t, self.device))

    def _restore(self, run: _Run) -> None:
        """Continue from the newest checkpoint when resuming (damaged or not: a corrupt one is reported)."""
        latest = run.manager.all()[-1] if run.manager.all() else None
        if self.resume == "yes" and latest is None:
            raise MoegptError(f"--resume: {run.run_dir} has no checkpoint to resume from")
        if self.resume == "no" or latest is None:
            if self.resume == "auto":
                self.emit("note", message=f"no checkpoint in {run.run_dir}: starting a fresh run")
            return
        state = load_checkpoint(latest, map_location=self.device)
        diffs = config_differences(state["config"], self.cfg.to_dict())
        if diffs:
            raise MoegptError(f"cannot resume {latest}: config differs from the checkpoint's: {'; '.join(diffs)}")
        if note := keep_decay_horizon(self.cfg, state["config"]):
            self.emit("note", message=note)
        ep = self.ep  # checkpoints hold every expert: a sharded run keeps its slice, whatever P wrote the file
        run.raw_model.load_state_dict(ep.local_model_state(state["model"]) if ep else state["model"])
        run.optimizer.load_state_dict(ep.local_optimizer_state(run.optimizer, state["optimizer"]) if ep
                                      else state["optimizer"])
        run.step, run.tokens_seen = int(state["step"]), int(state["data_state"]["tokens_seen"])
        run.best_val = float(state["best_val"])
        run.train_s, run.wall_s = (float(state.get("timing", {}).get(key, 0.0)) for key in ("train_s", "wall_s"))
        if self.restore_rng:
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
        run.resumed_from = str(latest)

    def _start(self, run: _Run) -> None:
        """Write the run folder's config, drop metrics past the resume step, wrap the model, announce."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run.run_dir / "config.toml")
            truncate_metrics(run.metrics_path, keep_through_step=run.step)
        if t.compile:
            run.model = torch.compile(run.model)
        if self.dist.enabled and self.ep is None:  # expert-parallel runs sum their gradients themselves
            run.model = DistributedDataParallel(run.model, device_ids=[self.device.index]
                                                if self.device.type == "cuda" else None)
        run.params = self.ep.full_params if self.ep else run.raw_model.num_params()
        run.tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * \
            (1 if self.ep else self.dist.world_size)
        self.emit("start", run_dir=str(run.run_dir), config=cfg.to_dict(), params=run.params,
                  device=str(self.device), precision=self.precision, resumed_from=run.resumed_from,
                  start_step=run.step, world_size=self.dist.world_size, moe_layers=run.raw_model.moe_layers,
                  moe_facts=layer_facts(cfg.model, cfg.moe),
                  native_kernel=native.status(self.device))  # builds the kernels before the clock starts
        run.start_step = run.step
        run.wall_start = run.window_start = time.perf_counter()
        run.model.train()

    def _train_step(self, run: _Run) -> tuple[float, Any, dict, torch.Tensor]:
        """One optimizer step (with gradient accumulation); stops before the update on a non-finite loss."""
        cfg, t, ep = self.cfg, self.cfg.train, self.ep
        step_start = time.perf_counter()
        lr = lr_at(run.step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        for micro in range(t.grad_accum):
            x, y = self._batch(run, micro)
            last_micro = micro == t.grad_accum - 1
            sync = run.model.no_sync() if self.dist.enabled and not ep and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    out = run.model(x, y)
                    aux = aux_losses(out.router_stats, cfg.moe)
                    loss = out.loss + aux["total"]
                if self._fault_nan_step == run.step + 1:
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"non-finite loss ({float(loss.detach())}) at step {run.step + 1}; stopped before the "
                        f"optimizer step, last good checkpoint: {run.manager.latest() or 'none'}")
                (loss / t.grad_accum).backward()
        grad_norm = self._clipped_grad_norm(run)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.raw_model.after_optimizer_step(dist.all_reduce if self.dist.enabled else _no_reduce)
        run.step += 1
        run.train_s += time.perf_counter() - step_start
        run.tokens_seen += run.tokens_per_step
        run.window_tokens += run.tokens_per_step
        self.emit("step", step=run.step)  # progress bars move every step, not only at log records
        return lr, out, aux, grad_norm

    def _batch(self, run: _Run, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A pure function of (seed, rank, step, micro). Expert-parallel: batch_size is the global batch, drawn
        as one process would draw it, and each rank takes its slice."""
        t, ep = self.cfg.train, self.ep
        x, y = run.ds.get_batch("train", t.batch_size, self.cfg.model.block_size,
                                batch_generator(t.seed, "train", 0 if ep else self.dist.rank, run.step, micro),
                                self.device)
        return (ep.local_rows(x), ep.local_rows(y)) if ep else (x, y)

    def _clipped_grad_norm(self, run: _Run) -> torch.Tensor:
        clip = self.cfg.train.grad_clip or float("inf")
        if self.ep:
            self.ep.sync_gradients()
            grad_norm = self.ep.clip_grad_norm_(clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), clip)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at step {run.step + 1}; stopped before the optimizer "
                                   f"step, last good checkpoint: {run.manager.latest() or 'none'}")
        return grad_norm

    def _after_step(self, run: _Run, lr: float, out: Any, aux: dict, grad_norm: torch.Tensor) -> None:
        """Log, evaluate, checkpoint and honour a stop signal, each at its interval."""
        t, step = self.cfg.train, run.step
        if step % t.log_interval == 0 or step == t.max_iters:
            now = time.perf_counter()
            record = log_record(step, run.tokens_seen, lr, self.ep.global_output(out) if self.ep else out, aux,
                                 grad_norm, run.window_tokens / max(now - run.window_start, 1e-9),
                                 run.raw_model.moe_layers)
            record.update(train_s=round(run.train_s, 3), wall_s=round(run.wall_s + now - run.wall_start, 3))
            run.window_start, run.window_tokens = now, 0
            self._write_metrics(run.metrics_path, record)
            self.emit("log", **record)
        improved = False
        if step % t.eval_interval == 0 or step == t.max_iters:
            run.last_val = self.evaluate(run.raw_model, run.ds)
            improved = run.last_val < run.best_val
            run.best_val = min(run.best_val, run.last_val)
            record = {"step": step, "tokens": run.tokens_seen, "val_ce": round(run.last_val, 5),
                      "best_val_ce": round(run.best_val, 5), "train_s": round(run.train_s, 3),
                      "wall_s": round(run.wall_s + time.perf_counter() - run.wall_start, 3)}
            self._write_metrics(run.metrics_path, record)
            self.emit("eval", **record)
        if step % t.ckpt_interval == 0 or step == t.max_iters or improved:
            self._save(run, is_best=improved)
        if self._stop_requested():
            path = self._save(run)
            raise TrainingInterrupted(self._signal or signal.SIGTERM, str(path) if path else None)

    def _save(self, run: _Run, is_best: bool = False) -> Path | None:
        # expert-parallel: every rank takes part in gathering the experts, rank 0 writes them
        ep = self.ep
        weights = (ep.full_model_state(), ep.full_optimizer_state(run.optimizer)) if ep else None
        if not self.dist.is_main:
            return None
        weights = weights or (run.raw_model.state_dict(), run.optimizer.state_dict())
        path = run.manager.save(run.step, self._checkpoint_state(run, weights), is_best=is_best)
        self.emit("checkpoint", path=str(path), step=run.step, best=is_best)
        return path

    def _checkpoint_state(self, run: _Run, weights: tuple[dict, dict]) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        data_dir = Path(cfg.data.data_root) / cfg.data.name
        return {"model": weights[0], "optimizer": weights[1],
                "scheduler": {"step": run.step, "lr": lr_at(run.step, cfg)}, "step": run.step,
                "data_state": {"step": run.step, "seed": t.seed, "tokens_seen": run.tokens_seen,
                               "world_size": self.dist.world_size},
                "rng": rng, "config": cfg.to_dict(), "best_val": run.best_val,
                "timing": {"train_s": run.train_s, "wall_s": run.wall_s + time.perf_counter() - run.wall_start},
                "data_ref": {"data_dir": str(data_dir.resolve()), "name": cfg.data.name,
                             "fingerprint": run.ds.fingerprint},
                "moegpt_version": __version__}

    def _finish(self, run: _Run) -> dict[str, Any]:
        in_sync = self.ep.in_sync() if self.ep else self._ranks_in_sync(run.raw_model)
        elapsed = time.perf_counter() - run.wall_start
        trained_tokens = (run.step - run.start_step) * run.tokens_per_step
        latest = run.manager.latest()
        summary = {"run_dir": str(run.run_dir), "steps": run.step, "tokens_seen": run.tokens_seen,
                   "final_val_ce": run.last_val, "best_val_ce": run.best_val if run.best_val < math.inf else None,
                   "wall_s": elapsed, "tokens_per_s": trained_tokens / elapsed if elapsed > 0 else 0.0,
                   "params": run.params, "checkpoint": str(latest) if latest else None,
                   "ranks_in_sync": in_sync, "world_size": self.dist.world_size, "precision": self.precision,
                   "device": str(self.device)}
        self.emit("end", **summary)
        return summary

    @torch.no_grad()
    def evaluate(self, model: GPT, ds: TokenDataset) -> float:
        """Mean cross-entropy on a fixed set of validation batches (the same every evaluation)."""
        t, was_training = self.cfg.train, model.training
        model.eval()
        total = 0.0
        for i in range(t.eval_iters):
            x, y = ds.get_batch("val", t.batch_size, self.cfg.model.block_size,
                                batch_generator(t.seed, "val", 0, 0, i), self.device)
            if self.ep:
                x, y = self.ep.local_rows(x), self.ep.local_rows(y)
            with autocast(self.device, self.precision):
                total += float(model(x, y).loss)
        model.train(was_training)
        return self.ep.mean_over_ranks(total / t.eval_iters) if self.ep else total / t.eval_iters

    def _write_metrics(self, path: Path, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            append_line(path, json.dumps(record))

    def _stop_requested(self) -> bool:
        """A signal arrived; expert-parallel ranks agree first (a checkpoint save is a collective there)."""
        stop = self._signal is not None
        return self.ep.any_rank(stop) if self.ep else stop

    def _ranks_in_sync(self, model: GPT) -> bool:
        if not self.dist.enabled:
            return True
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, checksum)
        return all(bool(torch.equal(g, gathered[0])) for g in gathered)

    def _signal_handlers(self):
        """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and stops."""
        def handler(signum, frame):
            self._signal = signum

        return stop_signals_handled(handler)


def _no_reduce(tensor: torch.Tensor) -> None:
    """One process: a sum over ranks is the tensor itself."""
