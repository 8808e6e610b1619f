"""The native routing kernels (csrc/softmax_topk_routing.cpp, csrc/sort_assignments.cpp).

The softmax top-k routing op against a slow, obviously-correct float64 reference written per token and per
expert (choices, gates, probabilities, both losses, and the logits' gradient from all three), and against the
Python path the router takes without it; what it refuses; then the counting sort of the dispatch against
argsort; then whole layers of every variant it serves, kernel against Python path, and where it stands aside.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_moe_contract import build_layer

import moegpt.moe.native as native
import moegpt.moe.softmax_routing as softmax_routing
from moegpt.moe import VARIANTS
from moegpt.moe.dispatch import sort_by_expert
from moegpt.moe.losses import router_z_loss, switch_balance_loss
from moegpt.moe.router import softmax_topk
from moegpt.moe.softmax_routing import SoftmaxTopKMoE
from moegpt.moe.stats import generating

if os.environ.get(native.DISABLE_ENV, "1").strip().lower() in native.OFF_VALUES:
    pytest.skip(f"{native.DISABLE_ENV} turns the native kernels off", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread", "kernels_loaded")


@pytest.fixture
def kernels_loaded():
    """Tests that call the ops directly need the library loaded (any test may run first, or alone)."""
    assert native.available(), native.reason()

SHAPES = [(768, 8, 2), (100, 64, 8), (5, 3, 3), (1, 1, 1), (70, 4, 1), (9, 130, 5)]
SERVED = [v for v in VARIANTS if issubclass(VARIANTS[v].layer, SoftmaxTopKMoE)]


def test_the_kernels_build_here():
    assert native.available(), native.reason()


def reference(logits_NE, k, normalize, w_N):
    """Per token: softmax in float64, the k largest logits (ties to the lower expert), gates; then the
    Switch balance loss E * sum_i f_i P_i and the z-loss mean(logsumexp^2), over the weighted tokens."""
    lg = logits_NE.double()
    values = lg.detach()
    N, E = lg.shape
    w = [1.0] * N if w_N is None else [float(v) for v in w_N]
    probs = torch.softmax(lg, dim=-1)
    idx, gates = [], []
    for n in range(N):
        chosen = sorted(range(E), key=lambda e: (-values[n, e].item(), e))[:k]
        g = probs[n, chosen]
        idx.append(chosen)
        gates.append(g / g.sum() if normalize else g)
    counts = [sum(w[n] for n in range(N) for e in idx[n] if e == i) for i in range(E)]
    assigned = max(sum(w) * k, 1.0)
    real = max(sum(w), 1.0)
    mean_probs = [sum(w[n] * probs[n, i] for n in range(N)) / real for i in range(E)]
    balance = E * sum(counts[i] / assigned * mean_probs[i] for i in range(E))
    z = sum(w[n] * torch.logsumexp(lg[n], 0) ** 2 for n in range(N)) / real
    return torch.tensor(idx), torch.stack(gates), probs, balance, z


def kernel(logits_NE, k, normalize, w_N):
    return native.NativeSoftmaxTopK.apply(logits_NE, k, normalize, w_N)


def python_path(logits_NE, k, normalize, w_N):
    probs = torch.softmax(logits_NE, dim=-1)
    idx, gate = softmax_topk(logits_NE, k, normalize, lambda _: probs)
    mask = None if w_N is None else w_N > 0
    return idx, gate, probs, switch_balance_loss(logits_NE, idx, mask, probs), router_z_loss(logits_NE, mask)


def case(shape, masked, seed=0, scale=3.0):
    N, E, K = shape
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, E, generator=gen) * scale).requires_grad_()
    w_N = None if not masked else (torch.rand(N, generator=gen) < 0.7).float()
    upstream = torch.randn(N, K, generator=gen), float(torch.randn(1, generator=gen)), 0.3
    return logits, w_N, upstream


def grad_of(route, logits, k, normalize, w_N, upstream):
    logits.grad = None
    idx, gate, probs, balance, z = route(logits, k, normalize, w_N)
    g_gate, g_balance, g_z = upstream
    (gate * g_gate.to(gate.dtype)).sum().add(balance * g_balance).add(z * g_z).backward()
    return (idx, gate.detach(), probs.detach(), balance.detach(), z.detach()), logits.grad.clone()


@pytest.mark.parametrize("masked", [False, True], ids=["all_real", "masked"])
@pytest.mark.parametrize("normalize", [True, False], ids=["renormalised", "raw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_E{}_K{}".format(*s))
def test_the_kernel_matches_a_float64_reference(shape, normalize, masked):
    logits, w_N, upstream = case(shape, masked)
    (idx, gate, probs, balance, z), grad = grad_of(kernel, logits, shape[2], normalize, w_N, upstream)
    ref_logits = logits.detach().double().requires_grad_()
    (r_idx, r_gate, r_probs, r_balance, r_z), r_grad = grad_of(
        reference, ref_logits, shape[2], normalize, w_N, upstream)
    assert torch.equal(idx, r_idx)
    torch.testing.assert_close(gate, r_gate.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, r_probs.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(balance, r_balance.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, r_z.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, r_grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True], ids=["all_real", "masked"])
@pytest.mark.parametrize("normalize", [True, False], ids=["renormalised", "raw"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "N{}_E{}_K{}".format(*s))
def test_the_kernel_matches_the_python_path(shape, normalize, masked):
    logits, w_N, upstream = case(shape, masked, seed=1)
    out, grad = grad_of(kernel, logits, shape[2], normalize, w_N, upstream)
    py_out, py_grad = grad_of(python_path, logits, shape[2], normalize, w_N, upstream)
    assert torch.equal(out[0], py_out[0])
    for got, want in zip(out[1:], py_out[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, py_grad, rtol=1e-4, atol=1e-6)


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 3.0, 5.0]])
    idx, gate, *_ = kernel(logits, 2, True, None)
    assert idx.tolist() == [[1, 2], [0, 1], [3, 0]]
    torch.testing.assert_close(gate[:2], torch.full((2, 2), 0.5))


def test_extreme_logits_stay_finite_and_exact():
    logits = torch.tensor([[80.0, -80.0, 0.0], [-1e4, -1e4 + 1, -1e4 + 2], [1e4, 1e4, -1e4]]).requires_grad_()
    upstream = torch.ones(3, 2), 1.0, 1e-6
    (idx, gate, probs, balance, z), grad = grad_of(kernel, logits, 2, False, None, upstream)
    ref_logits = logits.detach().double().requires_grad_()
    (_, r_gate, r_probs, r_balance, r_z), r_grad = grad_of(reference, ref_logits, 2, False, None, upstream)
    assert all(torch.isfinite(t).all() for t in (gate, probs, balance, z, grad))
    torch.testing.assert_close(probs, r_probs.float())
    torch.testing.assert_close(z, r_z.float())
    torch.testing.assert_close(grad, r_grad.float(), rtol=1e-4, atol=1e-6)


def test_no_real_token_gives_zero_losses_as_the_python_path():
    logits, _, upstream = case((12, 4, 2), masked=False)
    w_N = torch.zeros(12)
    out, grad = grad_of(kernel, logits, 2, True, w_N, upstream)
    py_out, py_grad = grad_of(python_path, logits, 2, True, w_N, upstream)
    assert out[3].item() == py_out[3].item() == 0.0 and out[4].item() == py_out[4].item() == 0.0
    torch.testing.assert_close(grad, py_grad)


@pytest.mark.parametrize("normalize", [True, False], ids=["renormalised", "raw"])
def test_results_repeat_bit_for_bit_on_any_thread_count(normalize):
    # 12,000 tokens of 8 experts: 3 chunks of the kernel's 4,096-row grain, so two threads split the rows
    # (chunk starts off the vector width) both ways, and each chunk has its own backward scratch
    logits, w_N, upstream = case((12000, 8, 2), masked=True, seed=3)
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        runs.append(grad_of(kernel, logits, 2, normalize, w_N, upstream))
    for out, grad in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, runs[0][0], strict=True))
        assert torch.equal(grad, runs[0][1])
    torch.set_num_threads(2)
    out, grad = runs[1]
    py_out, py_grad = grad_of(python_path, logits, 2, normalize, w_N, upstream)
    assert torch.equal(out[0], py_out[0])
    for got, want in zip(out[1:], py_out[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, py_grad, rtol=1e-4, atol=1e-6)


def test_no_token_at_all_routes_and_differentiates():
    logits = torch.zeros(0, 4, requires_grad=True)
    idx, gate, probs, balance, z = kernel(logits, 2, True, None)
    assert idx.shape == (0, 2) and gate.shape == (0, 2) and probs.shape == (0, 4)
    (gate.sum() + balance + z).backward()
    assert logits.grad.shape == (0, 4)


def test_a_nan_logit_ranks_first_as_in_torch_topk():
    logits = torch.tensor([[1.0, float("nan"), 2.0], [float("nan"), 3.0, float("nan")], [0.0, 5.0, 4.0]])
    idx, *_ = kernel(logits, 2, True, None)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 2]]
    assert [sorted(row) for row in idx.tolist()] == [sorted(row) for row in torch.topk(logits, 2).indices.tolist()]


def test_inference_mode_routes_as_with_gradients():
    logits, w_N, _ = case((300, 8, 2), masked=True, seed=4)
    with torch.inference_mode():
        out = kernel(logits.detach(), 2, True, w_N)
    want = python_path(logits.detach(), 2, True, w_N)
    assert torch.equal(out[0], want[0])
    for got, expected in zip(out[1:], want[1:], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("logits, k, match", [
    (torch.randn(4, 3), 4, "k <= E"), (torch.randn(4, 3), 0, "k <= E"), (torch.randn(4, 3).double(), 1, "float32"),
    (torch.randn(4), 1, "float32"), (torch.randn(4, 0), 1, "k <= E")])
def test_the_forward_refuses_what_it_cannot_route(logits, k, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moegpt_native.softmax_topk_routing(logits, k, True, None)


def test_the_forward_refuses_token_weights_of_another_length():
    with pytest.raises(RuntimeError, match="token_weights"):
        torch.ops.moegpt_native.softmax_topk_routing(torch.randn(4, 3), 1, True, torch.ones(5))


def test_the_backward_refuses_choices_its_forward_did_not_make():
    idx, gate, probs, lse, fraction, *_ = torch.ops.moegpt_native.softmax_topk_routing(
        torch.randn(6, 4), 2, True, None)
    bad = idx.clone()
    bad[3, 1] = 4
    one = torch.ones(())
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moegpt_native.softmax_topk_routing_backward(
            torch.ones_like(gate), one, one, probs, lse, bad, gate, fraction, None, True)
    with pytest.raises(RuntimeError, match="idx"):
        torch.ops.moegpt_native.softmax_topk_routing_backward(
            torch.ones_like(gate), one, one, probs, lse, idx.t(), gate, fraction, None, True)
    with pytest.raises(RuntimeError, match="expert-major"):
        torch.ops.moegpt_native.softmax_topk_routing_backward(
            torch.ones_like(gate), one, one, probs.contiguous(), lse, idx, gate, fraction, None, True)


# ---- the dispatch's counting sort ----------------------------------------------------------------

def argsort_path(idx_NK, n_expert):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "sorts_assignments", lambda _: False)
        return sort_by_expert(idx_NK, n_expert)


@pytest.mark.parametrize("N, K, E, empty", [(300, 2, 6, 0.0), (300, 2, 6, 0.4), (50, 3, 1, 0.2), (0, 2, 4, 0.0),
                                            (20, 2, 8, 1.0), (4096, 8, 64, 0.1)])
def test_the_counting_sort_is_the_stable_argsort(N, K, E, empty):
    gen = torch.Generator().manual_seed(N + K + E)
    idx = torch.randint(0, E, (N, K), generator=gen)
    idx[torch.rand(N, K, generator=gen) < empty] = -1
    order, tok, counts = sort_by_expert(idx, E)
    want_order, want_tok, want_counts = argsort_path(idx, E)
    assert torch.equal(order, want_order) and torch.equal(tok, want_tok) and counts == want_counts
    assert isinstance(counts, list) and len(counts) == E


def test_choices_of_another_integer_type_take_the_argsort():
    idx = torch.tensor([[2, 0], [1, -1], [0, 2]], dtype=torch.int32)
    assert not native.sorts_assignments(idx)
    order, tok, counts = sort_by_expert(idx, 3)
    assert order.tolist() == [1, 4, 2, 0, 5] and tok.tolist() == [0, 2, 1, 0, 2] and counts == [2, 1, 2]


@pytest.mark.parametrize("bad", [6, -2])
def test_the_counting_sort_refuses_an_expert_out_of_range(bad):
    idx = torch.zeros(5, 2, dtype=torch.long)
    idx[2, 1] = bad
    with pytest.raises(RuntimeError, match="out of range"):
        sort_by_expert(idx, 6)


def test_the_native_routing_stands_aside_under_compile(monkeypatch):
    idx, logits = torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 3)
    assert native.sorts_assignments(idx) and native.serves_routing(logits)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not native.sorts_assignments(idx) and not native.serves_routing(logits)


# ---- whole layers ----------------------------------------------------------------------------------

def routing_kernel_off():
    patch = pytest.MonkeyPatch()
    patch.setattr(native, "serves_routing", lambda _: False)
    return patch


def run_layer(variant, x, mask, calls, kernel_on=True):
    layer = build_layer(variant, seed=5)
    patch = None if kernel_on else routing_kernel_off()
    try:
        y, stats = layer(x, mask)
        (y.square().sum() + 0.7 * stats.balance + 0.2 * stats.z).backward()
    finally:
        if patch is not None:
            patch.undo()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), stats, grads


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    apply = native.NativeSoftmaxTopK.apply
    monkeypatch.setattr(native.NativeSoftmaxTopK, "apply", lambda *a: calls.append(a) or apply(*a))
    return calls


def test_the_served_variants_are_the_softmax_top_k_ones():
    assert {"topk", "switch", "shared"} <= set(SERVED)
    assert not {"noisy-topk", "aux-free", "expert-choice", "soft"} & set(SERVED)


@pytest.mark.parametrize("masked", [False, True], ids=["all_real", "masked"])
@pytest.mark.parametrize("variant", SERVED)
def test_a_layer_routes_through_the_kernel_as_through_python(variant, masked, kernel_calls):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 40, 32, generator=gen)
    mask = None if not masked else torch.rand(4, 40, generator=gen) < 0.8
    y, stats, grads = run_layer(variant, x, mask, kernel_calls)
    assert len(kernel_calls) == 1
    py_y, py_stats, py_grads = run_layer(variant, x, mask, kernel_calls, kernel_on=False)
    assert len(kernel_calls) == 1
    assert torch.equal(stats.expert_idx_NK, py_stats.expert_idx_NK)
    torch.testing.assert_close(y, py_y, rtol=1e-5, atol=1e-5)
    for field in ("balance", "z", "seq_balance", "expert_weight_NK", "router_probs_NE"):
        torch.testing.assert_close(getattr(stats, field), getattr(py_stats, field), rtol=1e-5, atol=1e-6)
    assert (stats.dropped_NK is None) == (py_stats.dropped_NK is None)
    if stats.dropped_NK is not None:
        assert torch.equal(stats.dropped_NK, py_stats.dropped_NK)
    for name, grad in grads.items():
        # fp32 sums over 160 tokens of terms up to a few hundred, in different orders: tolerance by the scale
        scale = max(1.0, py_grads[name].abs().max().item())
        torch.testing.assert_close(grad, py_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("variant", SERVED)
def test_the_kernel_stands_aside_where_it_does_not_serve(variant, kernel_calls):
    layer = build_layer(variant)
    with torch.no_grad():
        layer(torch.randn(1, 8, 32))  # fewer tokens than SMALL_BATCH: the plain selection
        with generating():
            layer(torch.randn(4, 40, 32))  # generation computes no losses
    assert kernel_calls == []
    with torch.no_grad():
        layer(torch.randn(4, 40, 32))
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("variant", SERVED)
def test_the_kernel_stands_aside_when_losses_span_ranks(variant, monkeypatch):
    """Expert parallelism and a global batch take their losses over every rank's tokens: the Python path."""
    layer = build_layer(variant)
    logits = torch.randn(160, layer.n_expert)
    assert layer._routes_natively(logits)
    monkeypatch.setattr(softmax_routing, "is_global", lambda: True)
    assert not layer._routes_natively(logits)
    monkeypatch.undo()
    layer.expert_parallel = object()
    assert not layer._routes_natively(logits)
