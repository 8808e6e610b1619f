"""Checkpoint layer: round trip, retention, corruption, refusal of pickled code, crashes and signals."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

import moegpt
from moegpt import checkpoint as ck
from moegpt.checkpoint import (
    CheckpointManager,
    checkpoint_hash,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    signals_deferred,
)
from moegpt.errors import MoegptError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- helpers


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, (it + 1) / 10))
    return model, opt, sched


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: LRScheduler, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (4, 5), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _realistic_state(step: int = 1) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer, LRScheduler]:
    model, opt, sched = _model_and_opt()
    _train_step(model, opt, sched, seed=step)
    gen = torch.Generator().manual_seed(123)
    torch.rand(3, generator=gen)  # move it off its seed so the saved state is not trivial
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "sampler": {"epoch": 0, "position": 4096, "order_seed": 7, "shards": ["a.bin", "b.bin"]},
        "rng": {"torch": torch.get_rng_state(), "data": gen.get_state(), "python": random.getstate()},
        "config": {"model": {"n_layer": 2, "dropout": 0.0, "bias": False},
                   "moe": {"variant": "topk", "capacity_factor": 1.25}, "train": {"device": "cpu"}},
        "data": {"path": "data/tiny", "sha256": "ab" * 32, "tokens": 123456},
        "version": moegpt.__version__,
        "misc": OrderedDict(dtype=torch.bfloat16, device=torch.device("cpu"), shape=torch.Size([2, 3]),
                            nothing=None, pair=(1, 2.5), big=2**70, neg_inf=float("-inf")),
    }
    return state, model, opt, sched


def _assert_same(a: object, b: object, where: str = "state") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _tiny(step: int) -> dict:
    return {"step": step, "w": torch.full((64,), float(step))}


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_realistic_state_resumes_bit_identically(tmp_path: Path) -> None:
    state, model, opt, sched = _realistic_state()
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)

    # The loaded state must actually restore training: one more step from each gives identical weights.
    model2, opt2, sched2 = _model_and_opt(seed=99)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    _train_step(model, opt, sched, seed=5)
    _train_step(model2, opt2, sched2, seed=5)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)

    gen = torch.Generator()
    gen.set_state(loaded["rng"]["data"])
    ref = torch.Generator()
    ref.set_state(state["rng"]["data"])
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))


def test_header_records_payload_hash_and_checkpoint_hash_is_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _tiny(3))
    raw = path.read_bytes()
    assert raw[:8] == b"MOEGPTCK"
    assert hashlib.sha256(raw[ck.HEADER_SIZE:]).hexdigest().encode() in raw[: ck.HEADER_SIZE]
    before = checkpoint_hash(path)
    assert before == hashlib.sha256(raw).hexdigest()
    load_checkpoint(path)
    assert checkpoint_hash(path) == before  # loading never touches the file
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


@pytest.mark.parametrize("bad", [
    {"loss": np.float64(1.0)},  # a numpy scalar from a metrics dict
    {"nested": [1, {"obj": object()}]},
    {"fn": len},
    {frozenset([1]): 1},
])
def test_state_weights_only_cannot_load_is_rejected_at_save_time(tmp_path: Path, bad: dict) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _tiny(1))
    with pytest.raises(TypeError, match="checkpoint state"):
        save_checkpoint(path, bad)
    assert load_checkpoint(path)["step"] == 1  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# ------------------------------------------------------------------------------------------ retention


def test_manager_keeps_newest_steps_plus_best(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "run", keep=2)
    assert mgr.latest() is None and mgr.best() is None and mgr.all() == []
    for step in range(1, 6):
        p = mgr.save(step, _tiny(step), is_best=(step == 2))
        assert p.name == f"step_{step:06d}.pt"
        if step == 2:
            best_hash = checkpoint_hash(p)
    assert [p.name for p in mgr.all()] == ["step_000004.pt", "step_000005.pt"]
    assert mgr.latest() == tmp_path / "run" / "ckpt" / "step_000005.pt"
    assert mgr.best() == tmp_path / "run" / "ckpt" / "best.pt"
    assert checkpoint_hash(mgr.best()) == best_hash  # survived the pruning of step_000002.pt
    assert load_checkpoint(mgr.best())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == [
        "best.pt", "step_000004.pt", "step_000005.pt"]

    mgr.save(6, _tiny(6), is_best=True)
    assert load_checkpoint(mgr.best())["step"] == 6
    assert [p.name for p in mgr.all()] == ["step_000005.pt", "step_000006.pt"]


def test_steps_sort_numerically_past_the_zero_padding(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (999_998, 999_999, 1_000_000):
        mgr.save(step, _tiny(step))
    assert [p.name for p in mgr.all()] == ["step_999999.pt", "step_1000000.pt"]
    assert load_checkpoint(mgr.latest())["step"] == 1_000_000


def test_latest_skips_a_damaged_step_file(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, _tiny(1))
    p2 = mgr.save(2, _tiny(2))
    p2.write_bytes(p2.read_bytes()[:-10])
    assert mgr.latest() == mgr.step_path(1)


def test_resolve_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(MoegptError, match="checkpoint not found"):
        resolve_checkpoint(run)
    run.mkdir()
    with pytest.raises(MoegptError, match="no checkpoint in"):
        resolve_checkpoint(run)
    mgr = CheckpointManager(run)
    mgr.save(1, _tiny(1))
    mgr.save(2, _tiny(2))
    assert resolve_checkpoint(run) == mgr.step_path(2)  # no best.pt: the latest step file
    mgr.save(3, _tiny(3), is_best=True)
    mgr.save(4, _tiny(4))
    assert resolve_checkpoint(run) == run / "ckpt" / "best.pt"
    assert resolve_checkpoint(run / "ckpt") == run / "ckpt" / "best.pt"
    assert resolve_checkpoint(mgr.step_path(4)) == mgr.step_path(4)
    with pytest.raises(MoegptError, match="checkpoint not found"):
        resolve_checkpoint(run / "ckpt" / "step_000001.pt")  # pruned


# ------------------------------------------------------------------------------------------ corruption


def _corrupt_truncated(raw: bytes) -> bytes:
    return raw[: len(raw) - 100]


def _corrupt_truncated_header(raw: bytes) -> bytes:
    return raw[:20]


def _corrupt_empty(raw: bytes) -> bytes:
    return b""


def _corrupt_payload_byte(raw: bytes) -> bytes:
    i = ck.HEADER_SIZE + (len(raw) - ck.HEADER_SIZE) // 2
    return raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]


def _corrupt_hash_field(raw: bytes) -> bytes:
    i = 8 + 4 + 10
    return raw[:i] + (b"0" if raw[i:i + 1] != b"0" else b"1") + raw[i + 1:]


def _corrupt_trailing(raw: bytes) -> bytes:
    return raw + b"\0"


@pytest.mark.parametrize("damage, why", [
    (_corrupt_truncated, "truncated"),
    (_corrupt_truncated_header, "truncated header"),
    (_corrupt_empty, "empty file"),
    (_corrupt_payload_byte, "content hash mismatch"),
    (_corrupt_hash_field, "content hash mismatch"),
    (_corrupt_trailing, "trailing bytes"),
])
def test_damaged_checkpoint_is_reported_corrupt(tmp_path: Path, damage, why: str) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _realistic_state()[0])
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MoegptError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint corrupt: {path}: ") and why in msg
    assert "\n" not in msg


def test_plain_torch_file_and_missing_file(tmp_path: Path) -> None:
    plain = tmp_path / "nanogpt.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(MoegptError, match="checkpoint corrupt: .*bad magic"):
        load_checkpoint(plain)
    with pytest.raises(MoegptError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(MoegptError, match="checkpoint not found"):
        checkpoint_hash(tmp_path / "nope.pt")
    with pytest.raises(MoegptError, match="is a folder"):
        load_checkpoint(tmp_path)


class _RunsCode:
    """Unpickling this executes code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _file_with_valid_header(payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return ck._HEADER.pack(ck.MAGIC, ck.FORMAT_VERSION, digest, len(payload)) + payload


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "evil": _RunsCode(tmp_path / "ran")}, buf)
    payload = buf.getvalue()

    # The payload really does run code when unpickled unsafely, so the refusal below is meaningful.
    torch.load(io.BytesIO(payload), weights_only=False)
    assert (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()

    path = tmp_path / "evil.pt"
    path.write_bytes(_file_with_valid_header(payload))
    with pytest.raises(MoegptError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint refused: {path}: ") and "exec" in msg and "\n" not in msg
    assert "weights_only=False" not in msg
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------------- crashes and signals


def _run_child(code: str, run: Path, **env: str) -> subprocess.CompletedProcess:
    child_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(run)], env=child_env,
                          capture_output=True, text=True, timeout=120)


def test_kill_9_during_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    first = mgr.save(1, _realistic_state(1)[0], is_best=True)
    first_hash = checkpoint_hash(first)

    proc = _run_child("""
        import sys, torch
        from moegpt.checkpoint import CheckpointManager
        CheckpointManager(sys.argv[1]).save(2, {"step": 2, "w": torch.ones(200_000)}, is_best=True)
        print("save returned")
    """, run, MOEGPT_FAULT_KILL_DURING_CKPT="1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "save returned" not in proc.stdout

    ckpt_dir = run / "ckpt"
    temps = [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]
    assert len(temps) == 1 and temps[0].stat().st_size > ck.HEADER_SIZE  # it died mid-write
    assert not mgr.step_path(2).exists()
    assert mgr.all() == [first] and mgr.latest() == first and mgr.best() == ckpt_dir / "best.pt"
    assert resolve_checkpoint(run) == ckpt_dir / "best.pt"
    assert checkpoint_hash(first) == first_hash
    assert load_checkpoint(first)["step"] == 1
    with pytest.raises(MoegptError, match="checkpoint corrupt"):
        load_checkpoint(temps[0])  # the half-written bytes really are unusable

    CheckpointManager(run)  # a new manager (a resumed run) clears the dead process's temp file
    assert not temps[0].exists()


def test_sigterm_during_save_is_acted_on_after_the_file_is_complete(tmp_path: Path) -> None:
    # Default SIGTERM action kills at once; inside the save it must wait until the rename is done.
    proc = _run_child("""
        import os, signal, sys, torch
        from moegpt import checkpoint as ck
        original = ck._write_payload
        def write_with_signals(f, header, payload):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal while saving
            original(f, header, payload)
            print("write finished", flush=True)
        ck._write_payload = write_with_signals
        ck.CheckpointManager(sys.argv[1]).save(7, {"step": 7, "w": torch.ones(200_000)})
        print("after save", flush=True)
    """, tmp_path)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "write finished" in proc.stdout and "after save" not in proc.stdout
    path = tmp_path / "ckpt" / "step_000007.pt"
    assert load_checkpoint(path)["step"] == 7
    assert CheckpointManager(tmp_path).latest() == path


def test_sigint_during_save_raises_keyboardinterrupt_after_a_valid_file(tmp_path: Path,
                                                                        monkeypatch) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _tiny(1))
    original = ck._write_payload
    written = []

    def write_with_sigint(f, header, payload):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        original(f, header, payload)
        written.append(True)

    monkeypatch.setattr(ck, "_write_payload", write_with_sigint)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _tiny(2))
    assert written == [True]
    assert load_checkpoint(path)["step"] == 2


def test_signal_inside_signals_deferred_is_handled_after_the_block() -> None:
    seen: list[tuple[int, str]] = []
    phase = "before"

    def handler(signum, _frame):
        seen.append((signum, phase))

    old_int = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, handler)
    try:
        with signals_deferred() as deferred:
            phase = "inside"
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            # Wait (bounded) until the signals have reached the deferring handler.
            for _ in range(10_000_000):
                if len(deferred.pending) == 2:
                    break
            assert deferred.pending == [signal.SIGINT, signal.SIGTERM]
            assert seen == []
            phase = "after"
        assert seen == [(signal.SIGINT, "after"), (signal.SIGTERM, "after")]
        assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_default_sigint_inside_signals_deferred_raises_only_after_the_block() -> None:
    reached_end_of_block = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            reached_end_of_block = True
    assert reached_end_of_block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
