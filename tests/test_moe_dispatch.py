"""Dispatch backends (moegpt/moe/dispatch.py): every backend == loop == a per-token Python reference.

The reference is slow and obviously correct: for each token, for each of its choices, run that
expert's MLP on the token vector alone and add it with its weight. Outputs AND gradients (x, the
combine weights, every expert weight) must agree in fp32 to 1e-5, including dropped choices
(idx -1), empty experts, heavy imbalance and nothing kept at all, for every activation.
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import pytest
import torch

from moegpt.errors import MoegptError
from moegpt.moe import ACTIVATIONS, native
from moegpt.moe import BACKENDS as DISPATCH_BACKENDS
from moegpt.moe.dispatch import run_experts
from moegpt.moe.experts import ExpertBank

N, K, C, H, E = 16, 2, 16, 8, 4  # widths are multiples of 8 so `grouped` can run
TOL = 1e-5
# `sorted` with the native kernel turned off: its Python path (the kernel serves plain `sorted` on CPU from
# native.MIN_ASSIGNMENTS assignments; these tests' few go to the Python path unless the kernel is forced)
PYTHON_SORTED = "sorted (python path)"
NATIVE_SORTED = "sorted (native kernel)"


pytestmark = pytest.mark.usefixtures("single_thread")


def has_grouped_mm() -> bool:
    return getattr(torch, "_grouped_mm", None) is not None


def backends() -> list:
    no_kernel = [pytest.mark.skip(reason=f"native kernel: {native.reason()}")] if not native.available() else []
    out = [pytest.param(PYTHON_SORTED), pytest.param(NATIVE_SORTED, marks=no_kernel)]
    for name in DISPATCH_BACKENDS:
        if name == "loop":
            continue
        marks = [] if name != "grouped" or has_grouped_mm() else \
            [pytest.mark.skip(reason="torch._grouped_mm is missing in this torch")]
        out.append(pytest.param(name, marks=marks))
    return out


@contextlib.contextmanager
def native_kernel_on_every_call():
    """The sorted dispatch's native kernel however few the assignments."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "MIN_ASSIGNMENTS", 0)
        yield


@contextlib.contextmanager
def native_kernel_off():
    """The sorted dispatch's Python path, as on a machine where the native kernel is not built."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "available", lambda: False)
        yield


def reference(x_NC, idx_NK, weight_NK, bank: ExpertBank):
    rows = []
    for n in range(x_NC.shape[0]):
        acc = torch.zeros(bank.n_embd, dtype=x_NC.dtype)
        for j in range(idx_NK.shape[1]):
            e = int(idx_NK[n, j])
            if e < 0:
                continue
            h = x_NC[n] @ bank.w_in[e]
            if bank.activation == "swiglu":
                gate, up = h[:bank.hidden], h[bank.hidden:]
                h = gate * torch.sigmoid(gate) * up
            elif bank.activation == "gelu":
                h = 0.5 * h * (1.0 + torch.erf(h / 2.0 ** 0.5))
            elif bank.activation == "relu":
                h = torch.clamp(h, min=0.0)
            out = h if bank.w_out is None else h @ bank.w_out[e]
            acc = acc + weight_NK[n, j] * out
        rows.append(acc)
    return torch.stack(rows)


def make_idx(case: str, gen: torch.Generator) -> torch.Tensor:
    """[N, K] expert choices, distinct within a token, for one routing situation."""
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    if case == "dropped":
        idx[torch.rand(N, K, generator=gen) < 0.35] = -1
    elif case == "empty_expert":
        idx = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(N)])  # expert E-1 unused
        idx[0, 1] = -1
    elif case == "imbalanced":
        idx[:, 0] = 0  # every token's first choice is expert 0
        idx[:, 1] = torch.where(torch.rand(N, generator=gen) < 0.8, 1, 2)  # experts 3.. stay empty
    elif case == "all_dropped":
        idx[:] = -1
    elif case == "one_token":
        idx = idx[:1]
    assert case in ("random", "dropped", "empty_expert", "imbalanced", "all_dropped", "one_token")
    return idx


CASES = ["random", "dropped", "empty_expert", "imbalanced", "all_dropped", "one_token"]


@functools.cache  # reference and loop results are shared by the backend tests
def run_with_grads(backend: str, activation: str, case: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{activation}/{case}".encode()))
    bank = ExpertBank(E, C, H, activation)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    idx = make_idx(case, gen)
    x = torch.randn(idx.shape[0], C, generator=gen, requires_grad=True)
    w = torch.rand(idx.shape, generator=gen, requires_grad=True)
    grad_out = torch.randn(idx.shape[0], C, generator=gen)
    if backend == "reference":
        y = reference(x, idx, w, bank)
    elif backend == PYTHON_SORTED:
        with native_kernel_off():  # the path is chosen at forward: backward follows it
            y = run_experts(x, idx, w, bank, "sorted")
    elif backend == NATIVE_SORTED:
        with native_kernel_on_every_call():
            y = run_experts(x, idx, w, bank, "sorted")
        assert type(y.grad_fn).__name__ == "NativeSortedExpertsBackward"
    else:
        y = run_experts(x, idx, w, bank, backend)
    if y.requires_grad:  # the reference with every choice dropped is a constant zero
        (y * grad_out).sum().backward()
    tensors = {"y": y.detach(), "x.grad": x.grad, "weight.grad": w.grad}
    for name, p in bank.named_parameters():
        tensors[f"{name}.grad"] = p.grad
    return {k: (torch.zeros(()) if v is None else v) for k, v in tensors.items()}


def assert_close_all(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        g, w = got[key], want[key]
        if g.dim() == 0 or w.dim() == 0:  # a missing gradient only matches an all-zero one
            assert float(g.abs().max()) <= TOL and float(w.abs().max()) <= TOL, f"{label}: {key}"
            continue
        assert g.shape == w.shape, f"{label}: {key} shape {g.shape} != {w.shape}"
        err = float((g - w).abs().max())
        assert err <= TOL, f"{label}: {key} differs by {err:.2e}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_loop_matches_per_token_reference(activation, case):
    assert_close_all(run_with_grads("loop", activation, case), run_with_grads("reference", activation, case),
                     f"loop/{activation}/{case}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", backends())
def test_backend_matches_loop_and_reference(backend, activation, case):
    got = run_with_grads(backend, activation, case)
    label = f"{backend}/{activation}/{case}"
    assert_close_all(got, run_with_grads("loop", activation, case), f"{label} vs loop")
    assert_close_all(got, run_with_grads("reference", activation, case), f"{label} vs reference")


def test_reference_is_not_trivially_zero():
    out = run_with_grads("reference", "swiglu", "random")
    assert float(out["y"].abs().max()) > 1e-2
    assert all(float(v.abs().max()) > 0 for v in out.values())


def test_dropped_choices_contribute_nothing():
    gen = torch.Generator().manual_seed(0)
    bank = ExpertBank(E, C, H, "gelu")
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(3, C, generator=gen)
    idx = torch.tensor([[0, -1], [-1, -1], [2, 1]])
    w = torch.rand(3, 2, generator=gen)
    for backend in ["loop", *[b for b in DISPATCH_BACKENDS if b not in ("loop", "grouped")]]:
        y = run_experts(x, idx, w, bank, backend)
        assert torch.equal(y[1], torch.zeros(C)), backend
        w2 = w.clone()
        w2[0, 1] = 123.0  # the weight of a dropped choice is ignored
        assert torch.allclose(run_experts(x, idx, w2, bank, backend), y, atol=TOL), backend


def test_unknown_backend_raises_naming_valid_ones():
    bank = ExpertBank(E, C, H, "relu")
    with pytest.raises(MoegptError, match="unknown dispatch backend 'nope'.*sorted"):
        run_experts(torch.zeros(2, C), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), bank, "nope")


@pytest.mark.skipif(not has_grouped_mm(), reason="torch._grouped_mm is missing in this torch")
def test_grouped_rejects_widths_not_multiple_of_8():
    bank = ExpertBank(E, 12, 6, "relu")
    torch.nn.init.normal_(bank.w_in)
    torch.nn.init.normal_(bank.w_out)
    with pytest.raises(MoegptError, match="multiples of 8"):
        run_experts(torch.zeros(2, 12), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), bank,
                    "grouped")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("backend", ["sorted", "bucketed"])
def test_inference_few_assignment_path_matches_reference(backend, rows, activation):
    # without autograd, a handful of assignments (a generated token) takes the per-choice path of
    # run_experts instead of the sort; it must give the reference's output, dropped slots included
    gen = torch.Generator().manual_seed(rows)
    bank = ExpertBank(E, C, H, activation)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    idx = make_idx("dropped", gen)[:rows]
    idx[-1] = -1  # one token with every choice dropped
    x = torch.randn(rows, C, generator=gen)
    w = torch.rand(idx.shape, generator=gen)
    with torch.inference_mode():
        got = run_experts(x, idx, w, bank, backend)
    torch.testing.assert_close(got, reference(x, idx, w, bank), atol=TOL, rtol=TOL)


def test_inference_path_follows_weight_updates():
    # the per-expert views it caches must see in-place updates (optimizer steps, load_state_dict)
    # and be rebuilt when a weight gets new storage (.to(), assigning .data)
    gen = torch.Generator().manual_seed(0)
    bank = ExpertBank(E, C, H, "swiglu")
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(1, C, generator=gen)
    idx, w = torch.tensor([[1, 3]]), torch.tensor([[0.6, 0.4]])

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            return run_experts(x, idx, w, bank, "sorted")

    decode()
    with torch.no_grad():
        bank.w_out.mul_(2.0)
    torch.testing.assert_close(decode(), reference(x, idx, w, bank), atol=TOL, rtol=TOL)
    bank.w_in.data = bank.w_in.data.clone() * -1.0
    torch.testing.assert_close(decode(), reference(x, idx, w, bank), atol=TOL, rtol=TOL)
    with torch.no_grad():  # used outside inference_mode too (plain no_grad evaluation)
        torch.testing.assert_close(run_experts(x, idx, w, bank, "sorted"), reference(x, idx, w, bank),
                                   atol=TOL, rtol=TOL)


@pytest.mark.parametrize("n_rows, one_thread", [(5, True), (2048, False)])  # 2048 x 32 values: every thread
def test_index_add_rows_matches_index_add_and_restores_the_thread_count(monkeypatch, n_rows, one_thread):
    from moegpt.moe import sorted_experts
    from moegpt.moe.sorted_experts import ONE_THREAD_ADD_VALUES, index_add_rows_

    assert (n_rows * 32 < ONE_THREAD_ADD_VALUES) == one_thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    counts_set: list[int] = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(sorted_experts.torch, "set_num_threads", lambda n: (counts_set.append(n), real_set(n)))
    try:
        gen = torch.Generator().manual_seed(0)
        rows = torch.randn(n_rows, 32, generator=gen)
        index = torch.randint(0, 9, (n_rows,), generator=gen)
        index[:3] = torch.tensor([3, 0, 3])  # a repeated row accumulates
        out = torch.randn(9, 32, generator=gen)
        expected = out.clone().index_add_(0, index, rows)
        assert torch.equal(index_add_rows_(out, index, rows), expected) and torch.equal(out, expected)
        assert torch.get_num_threads() == 2
        assert counts_set == ([1, 2] if one_thread else [])
    finally:
        real_set(threads)
