"""The native CPU kernel of the sorted dispatch (moegpt/moe/native.py, csrc/sorted_experts.cpp).

Equivalence against the Python path of the same dispatch (itself tested against a per-token reference in
test_moe_dispatch.py) at sizes where the kernel cuts experts between threads: outputs and every gradient,
for every activation and routing situation, bit-for-bit repeatable; then when the kernel serves a call
and how the dispatch falls back when it cannot be built.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from test_moe_dispatch import native_kernel_off

from moegpt.moe import ACTIVATIONS, native, native_build
from moegpt.moe.dispatch import add_experts_
from moegpt.moe.sorted_experts import sorted_experts

if os.environ.get(native.DISABLE_ENV, "1").strip().lower() in native.OFF_VALUES:
    pytest.skip(f"{native.DISABLE_ENV} turns the native kernel off", allow_module_level=True)

N, C, H, E, K = 300, 24, 16, 6, 2
TOL = 2e-5


@pytest.fixture(autouse=True)
def two_threads(monkeypatch):
    """Two shares of the assignments: an expert's rows are cut between threads. The kernel takes every
    call, however few its assignments (none, in all_dropped)."""
    monkeypatch.setattr(native, "MIN_ASSIGNMENTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_the_kernel_builds_here():
    assert native.available(), native.reason()


def test_a_region_runs_on_every_thread():
    """The kernel is built with OpenMP: without it ATen's parallel_for pragma is ignored and runs serially."""
    assert torch.ops.moegpt_native.region_threads(2) == 2
    torch.set_num_threads(1)
    assert torch.ops.moegpt_native.region_threads(2) == 1


def routing(case: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(tok_M, gate_M, counts_E) sorted by expert, as the dispatch passes them."""
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    if case == "dropped":  # tokens with one or no kept choice
        idx[torch.rand(N, K, generator=gen) < 0.4] = -1
    elif case == "idle_experts":
        idx = torch.stack([torch.randperm(3, generator=gen)[:K] for _ in range(N)])  # experts 3.. stay idle
    elif case == "one_expert":
        idx[:, 0], idx[:, 1] = 2, -1
    elif case == "all_dropped":
        idx[:] = -1
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    order = order[int((flat < 0).sum()):]
    counts = torch.bincount(flat[flat >= 0], minlength=E).tolist()
    return order // K, torch.rand(order.shape[0], generator=gen), counts


def run(case: str, activation: str, python_path: bool, hidden: int = H) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}/{activation}".encode()))
    tok, gate, counts = routing(case, gen)
    h_in = 2 * hidden if activation == "swiglu" else (C if activation == "linear" else hidden)
    w_in = (torch.randn(E, C, h_in, generator=gen) * 0.3).requires_grad_()
    w_out = None if activation == "linear" else (torch.randn(E, hidden, C, generator=gen) * 0.3).requires_grad_()
    x = torch.randn(N, C, generator=gen, requires_grad=True)
    gate.requires_grad_()
    grad_y = torch.randn(N, C, generator=gen)
    if python_path:
        with native_kernel_off():
            y = sorted_experts(x, tok, gate, counts, w_in, w_out, activation)
    else:
        y = sorted_experts(x, tok, gate, counts, w_in, w_out, activation)
    assert type(y.grad_fn).__name__.startswith("SortedExperts" if python_path else "NativeSortedExperts")
    y.backward(grad_y)
    out = {"y": y.detach(), "x": x.grad, "gate": gate.grad, "w_in": w_in.grad}
    if w_out is not None:
        out["w_out"] = w_out.grad
    return out


CASES = ["random", "dropped", "idle_experts", "one_expert", "all_dropped"]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        assert got[key].shape == w.shape, key
        if not w.numel():
            continue
        err = float((got[key] - w).abs().max())
        assert err <= TOL * max(1.0, float(w.abs().max())), f"{label}: {key} differs by {err:.2e}"


@pytest.mark.parametrize("threads", [2, 5])  # five: an expert spread over three or more shares
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_native_matches_the_python_path(case, activation, threads):
    torch.set_num_threads(threads)
    got = run(case, activation, python_path=False)
    assert_same(got, run(case, activation, python_path=True), f"{case}/{activation}")
    if case == "idle_experts":
        assert float(got["w_in"][3:].abs().max()) == 0.0  # idle experts get exact zero gradients


@pytest.mark.parametrize("hidden", [1, 7, 21, 40])
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu"])
def test_native_activation_passes_at_any_hidden_width(activation, hidden):
    """The fused activation passes (csrc/fused_activation.cpp) run whole vectors of 8 or 16 floats, then a
    scalar tail: widths below one vector, between, and past two."""
    got = run("dropped", activation, python_path=False, hidden=hidden)
    assert_same(got, run("dropped", activation, python_path=True, hidden=hidden), f"{activation}/H={hidden}")


@pytest.mark.parametrize("threads", [1, 2])
def test_native_results_repeat_bit_for_bit(threads):
    torch.set_num_threads(threads)
    first, second = run("dropped", "swiglu", False), run("dropped", "swiglu", False)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_native_serves_fp32_cpu_calls_of_enough_assignments_only(monkeypatch):
    x, w_in, w_out, gate = torch.randn(4, 8), torch.randn(2, 8, 16), torch.randn(2, 16, 8), torch.rand(128)
    monkeypatch.setattr(native, "MIN_ASSIGNMENTS", 128)
    assert native.serves(x, gate, w_in, w_out, torch.float32, 1, "gelu")
    assert not native.serves(x, gate[1:], w_in, w_out, torch.float32, 1, "gelu")  # a few rows: the Python path
    assert not native.serves(x, gate.double(), w_in, w_out, torch.float32, 1, "gelu")
    assert not native.serves(x, gate, w_in, w_out, torch.bfloat16, 1, "gelu")  # autocast: the Python path's cast
    assert not native.serves(x.bfloat16(), gate, w_in, w_out, torch.float32, 1, "gelu")
    assert not native.serves(x, gate, w_in, w_out, torch.float32, 64, "gelu")  # bucketing is the Python path's
    assert not native.serves(x, gate, w_in, w_out, torch.float32, 1, "a-new-activation")
    gate_NK = torch.rand(4, 2)
    assert native.serves_decode(x, x, gate_NK, w_in, w_out, "gelu")
    assert not native.serves_decode(x, x, gate_NK, w_in.transpose(1, 2).contiguous().transpose(1, 2), w_out, "gelu")


def test_the_kernel_refuses_mismatched_inputs():
    with pytest.raises(RuntimeError, match="counts must add up"):
        torch.ops.moegpt_native.sorted_experts_forward(
            torch.randn(4, 8), torch.tensor([0, 1]), torch.rand(2), [1, 2],
            torch.randn(2, 8, 16), torch.randn(2, 16, 8), native.ACTIVATION_CODES["gelu"])


@pytest.mark.parametrize("bad_token", [4, -1])
def test_the_kernel_refuses_a_token_out_of_range_both_ways(bad_token):
    """The segments' row gathers and adds index x, y and grad_y by token unchecked: a bad index is refused first."""
    x, tok, gate, counts = torch.randn(4, 8), torch.tensor([0, bad_token, 3]), torch.rand(3), [2, 1]
    w_in, w_out, gelu = torch.randn(2, 8, 16), torch.randn(2, 16, 8), native.ACTIVATION_CODES["gelu"]
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moegpt_native.sorted_experts_forward(x, tok, gate, counts, w_in, w_out, gelu)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moegpt_native.sorted_experts_backward(
            torch.randn(4, 8), x, tok, gate, counts, w_in, w_out, torch.randn(3, 16), torch.randn(3, 16), gelu)


@pytest.mark.parametrize("kept, hidden, match", [(torch.empty(0), torch.randn(3, 16), "a_kept"),
                                                 (torch.randn(3, 16), torch.randn(3, 8), "h: ")])
def test_the_backward_refuses_what_its_forward_did_not_make(kept, hidden, match):
    """The fused activation passes read h and GELU's kept activation through raw pointers: a wrong shape is
    refused, never read past its end."""
    x, tok, gate, counts = torch.randn(4, 8), torch.tensor([0, 1, 3]), torch.rand(3), [2, 1]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moegpt_native.sorted_experts_backward(
            torch.randn(4, 8), x, tok, gate, counts, torch.randn(2, 8, 16), torch.randn(2, 16, 8), hidden, kept,
            native.ACTIVATION_CODES["gelu"])


NINJA_FAILURE = ("Error building extension 'moegpt_native_x': [1/3] c++ -MMD -fopenmp -c sorted_experts.cpp\n"
                 "FAILED: sorted_experts.o\nc++ -MMD -fopenmp -c sorted_experts.cpp\n"
                 "sorted_experts.cpp:11:10: fatal error: omp.h: No such file or directory\n"
                 "compilation terminated.\nninja: build stopped: subcommand failed.")


def test_a_failed_build_says_why_in_one_line_and_is_not_retried(monkeypatch, capsys, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    def failing_compiler(**_):
        raise RuntimeError(NINJA_FAILURE)

    monkeypatch.setattr(cpp_extension, "load", failing_compiler)
    monkeypatch.setattr(native_build, "_cache_dir", lambda digest: tmp_path / digest)
    monkeypatch.setattr(native, "_state", {})
    why = "build failed: sorted_experts.cpp:11:10: fatal error: omp.h: No such file or directory"
    assert native.reason() == why
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("moegpt: compiling the native kernels")
    assert err[1:] == [f"moegpt: the native kernels are unavailable ({why}); routing, experts and decode steps run on "
                       f"their Python paths ({native.HINT})"]
    assert not native.serves(torch.randn(4, 8), torch.rand(1024), torch.randn(2, 8, 16), torch.randn(2, 16, 8),
                             torch.float32, 1, "gelu")

    monkeypatch.setattr(cpp_extension, "load", lambda **_: pytest.fail("a failed build was retried"))
    monkeypatch.setattr(native, "_state", {})  # the next process
    assert native.reason().startswith(why + "; an earlier build in ")
    assert "compiling" not in capsys.readouterr().err


def test_a_built_library_loads_without_the_builder(monkeypatch):
    """An existing library is loaded directly: no compiler, ninja or lock (a read-only cache works)."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **_: pytest.fail("the builder ran for a built library"))
    monkeypatch.setattr(native_build, "_build_lock", lambda _: pytest.fail("the lock was taken"))
    monkeypatch.setattr(native, "_state", {})
    assert native.reason() is None


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_the_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(native.DISABLE_ENV, value)
    monkeypatch.setattr(native, "_state", {})
    assert native.reason() == f"{native.DISABLE_ENV}={value}"


def test_native_runs_under_inference_mode_as_the_python_path():
    """Worker threads take the caller's modes: tensors made under inference mode are written only inside it."""
    gen = torch.Generator().manual_seed(7)
    tok, gate, counts = routing("random", gen)
    with torch.inference_mode():
        x, w_in, w_out = torch.randn(N, C, generator=gen), torch.randn(E, C, H, generator=gen), \
            torch.randn(E, H, C, generator=gen)
        got = sorted_experts(x, tok, gate, counts, w_in, w_out, "gelu")
        with native_kernel_off():
            want = sorted_experts(x, tok, gate, counts, w_in, w_out, "gelu")
    assert float((got - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows", [1, 3])
def test_native_decode_adds_the_experts_as_the_python_path(activation, rows):
    """A generated token's chosen experts onto its residual (dispatch.add_experts_), with a dropped choice and
    residual rows inside a wider buffer, through the kernel (one op) and through the Python path."""
    from moegpt.moe.experts import ExpertBank
    from moegpt.op_count import count_ops

    gen = torch.Generator().manual_seed(zlib.crc32(f"decode/{activation}/{rows}".encode()))
    bank = ExpertBank(E, C, H, activation)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        x = torch.randn(rows, C, generator=gen)
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(rows)])
        idx[0, 1] = -1
        gate = torch.rand(rows, K, generator=gen)
        start = torch.randn(rows, C + 5, generator=gen)
        got, want = start.clone(), start.clone()
        got_rows = got[:, :C]
        ops = count_ops(lambda: add_experts_(got_rows, x, idx, gate, bank))
        with native_kernel_off():
            add_experts_(want[:, :C], x, idx, gate, bank)
    assert ops == {"moegpt_native.add_experts_.default": 1}
    assert torch.equal(got[:, C:], start[:, C:])  # only the residual's own columns are written
    assert float((got - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


def decode_case(activation: str, hidden: int, rows: int = 2):
    """A bank, one generated token's rows and their choices (one dropped) for the decode kernel."""
    from moegpt.moe.experts import ExpertBank

    gen = torch.Generator().manual_seed(zlib.crc32(f"decode/{activation}/{hidden}/{rows}".encode()))
    bank = ExpertBank(E, C, hidden, activation)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(rows)])
    idx[0, 1] = -1
    return bank, torch.randn(rows, C, generator=gen), idx, torch.rand(rows, K, generator=gen)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden", [1, 16, 21])
def test_native_decode_split_with_the_helper_thread_adds_what_one_thread_does(activation, hidden):
    """Split, the helper thread takes half of every chosen expert's hidden units (of the output columns for
    linear), summed after the caller's half: one thread's result to rounding, also with an empty half (one
    hidden unit) or uneven halves, and the same bits every time."""
    bank, x, idx, gate = decode_case(activation, hidden)
    code = native.ACTIVATION_CODES[activation]
    start = torch.randn(x.shape[0], C)
    with torch.no_grad():
        whole = torch.ops.moegpt_native.add_experts_(start.clone(), x, idx, gate, bank.w_in, bank.w_out, code)
        with native_kernel_off():
            want = add_experts_(start.clone(), x, idx, gate, bank)
        split = [torch.ops.moegpt_native.add_experts_(start.clone(), x, idx, gate, bank.w_in, bank.w_out, code,
                                                      True) for _ in range(20)]
    assert float((whole - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))
    assert float((split[0] - whole).abs().max()) <= TOL * max(1.0, float(whole.abs().max()))
    assert all(torch.equal(s, split[0]) for s in split)


def test_the_helper_thread_takes_the_second_half():
    """The inline fallback gives the same bits, so equality alone would not show the helper ever ran."""
    assert torch.ops.moegpt_native.halves_on_two_threads()


def test_the_decode_kernel_refuses_a_residual_that_overlaps_its_input():
    bank, x, idx, gate = decode_case("gelu", 16)
    code = native.ACTIVATION_CODES["gelu"]
    with torch.no_grad():
        for residual in (x, torch.randn(1, C).expand(x.shape[0], C)):
            with pytest.raises(RuntimeError, match="overlap|memory location"):
                torch.ops.moegpt_native.add_experts_(residual, x, idx, gate, bank.w_in, bank.w_out, code, True)


def test_the_helper_thread_serves_calls_from_many_threads_and_a_forked_child():
    """Calls that find the helper busy run both halves themselves; a forked child (where the parent's helper
    did not follow) makes its own."""
    import concurrent.futures
    import multiprocessing

    bank, x, idx, gate = decode_case("swiglu", 16)
    code = native.ACTIVATION_CODES["swiglu"]

    def split_call(_=None):
        out = torch.zeros(x.shape[0], C)
        return torch.ops.moegpt_native.add_experts_(out, x, idx, gate, bank.w_in, bank.w_out, code, True)

    with torch.no_grad():
        want = split_call()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(split_call, range(200)))
        assert all(torch.equal(g, want) for g in got)
        child = multiprocessing.get_context("fork").Process(target=_split_in_child, args=(bank, x, idx, gate, want))
        child.start()
        child.join(60)
    assert child.exitcode == 0


def _split_in_child(bank, x, idx, gate, want):
    out = torch.zeros(x.shape[0], C)
    with torch.no_grad():
        got = torch.ops.moegpt_native.add_experts_(out, x, idx, gate, bank.w_in, bank.w_out,
                                                   native.ACTIVATION_CODES["swiglu"], True)
    os._exit(0 if torch.equal(got, want) else 1)


class KernelSplits(torch.utils._python_dispatch.TorchDispatchMode):
    """(op name, its `split` argument) of every decode kernel call made inside it."""

    SPLIT_AT = {"moegpt_native.add_experts_.default": 7, "moegpt_native.rows_matmul.default": 2}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (at := self.SPLIT_AT.get(str(func))) is not None:
            # a dispatch mode sees arguments equal to their default left out
            self.seen.append(args[at] if len(args) > at else (kwargs or {}).get("split", False))
        return func(*args, **(kwargs or {}))


def test_the_decode_dispatch_splits_big_experts_when_the_caller_has_threads(monkeypatch):
    """Split when the chosen weights reach DECODE_SPLIT_VALUES and the code around the decode step's
    one-thread block has more than one thread."""
    from moegpt.moe import dispatch
    from moegpt.runtime import one_thread

    bank, x, idx, gate = decode_case("gelu", 16, rows=1)
    chosen = idx.numel() * bank.params_per_expert  # what the choices may read (one is dropped: counted alike)
    residual = torch.zeros(1, C)

    def splits(split_values: int) -> list[bool]:
        monkeypatch.setattr(native, "DECODE_SPLIT_VALUES", split_values)
        with KernelSplits() as spy, torch.no_grad(), one_thread():
            dispatch.add_experts_(residual, x, idx, gate, bank)
        return spy.seen

    assert splits(chosen + 1) == [False]  # too small to repay the hand-off
    assert splits(chosen) == [True]  # the caller has two threads (the fixture's)
    torch.set_num_threads(1)
    assert splits(chosen) == [False]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("out_features", [1, 7, 64, 257])
def test_rows_matmul_split_or_not_is_the_product(rows, out_features):
    """x @ w for a generated token's rows (rows inside a wider buffer), the output columns split with the
    helper thread or not; an odd width leaves the halves uneven, a width of one leaves one empty."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, C + 3, generator=gen)[:, :C]
    w = torch.randn(C, out_features, generator=gen)
    want = x @ w
    for split in (False, True):
        got = torch.ops.moegpt_native.rows_matmul(x, w, split)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= TOL * max(1.0, float(want.abs().max())), split


def test_rows_matmul_refuses_what_it_cannot_read():
    x, w = torch.randn(2, C), torch.randn(C, 8)
    for bad_x, bad_w in ((x.t(), w), (x, w.t()), (x.double(), w), (x, torch.randn(C + 1, 8))):
        with pytest.raises(RuntimeError):
            torch.ops.moegpt_native.rows_matmul(bad_x, bad_w, True)


def test_a_big_few_row_product_is_split_only_when_the_caller_has_threads(monkeypatch):
    """The model's Linear (the output head of a decode step) splits a large few-row product; a small weight,
    one thread around the decode step, a bias or autograd keep MKL's product."""
    from moegpt.model import Linear
    from moegpt.runtime import one_thread

    head = Linear(C, 96, bias=False)
    x = torch.randn(1, C)

    def kernel_calls(layer=head, grad=False) -> list[bool]:
        with KernelSplits() as spy, torch.set_grad_enabled(grad), one_thread():
            out = layer(x)
        assert torch.allclose(out, x @ layer.weight.t() + (0 if layer.bias is None else layer.bias), atol=1e-5)
        return spy.seen

    monkeypatch.setattr(native, "DECODE_SPLIT_VALUES", C * 96)
    assert kernel_calls() == [True]
    assert kernel_calls(grad=True) == []
    assert kernel_calls(Linear(C, 96, bias=True)) == []
    monkeypatch.setattr(native, "DECODE_SPLIT_VALUES", C * 96 + 1)
    assert kernel_calls() == []
    monkeypatch.setattr(native, "DECODE_SPLIT_VALUES", C * 96)
    strided = x
    x = torch.randn(1, 2 * C)[:, ::2]  # rows the kernel cannot read: MKL's product instead of a refusal
    assert kernel_calls() == []
    x = strided
    torch.set_num_threads(1)
    assert kernel_calls() == []


def test_the_split_gate_asks_for_no_thread_count_under_torch_compile(monkeypatch):
    """torch.get_num_threads() would break a compiled graph: the gate declines before asking."""
    from moegpt import runtime

    monkeypatch.setattr(native, "DECODE_SPLIT_VALUES", 1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(runtime, "caller_threads", lambda: pytest.fail("asked for the thread count"))
    monkeypatch.setattr(native, "caller_threads", lambda: pytest.fail("asked for the thread count"))
    assert not native.splits_rows_matmul(torch.randn(1, C), torch.randn(C, 8))


def test_missing_sources_fall_back_with_their_reason(monkeypatch):
    monkeypatch.setattr(native_build, "SOURCES", (native_build.CSRC / "no_such_file.cpp",))
    monkeypatch.setattr(native, "_state", {})
    assert native.reason().startswith("cannot load: ") and "no_such_file.cpp" in native.reason()


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path):
    """torch waits forever on its lock file; one left behind by a killed build goes once ours is held."""
    (tmp_path / "lock").write_text("")
    with native_build._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_the_kernels_share_torchs_thread_pool():
    assert native._thread_pool_problem() is None


def test_native_decode_refuses_a_bad_expert_before_writing_and_counts_its_write():
    from moegpt.moe.experts import ExpertBank

    bank = ExpertBank(E, C, H, "gelu")
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    residual, x = torch.randn(2, C), torch.randn(2, C)
    before = residual.clone()
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moegpt_native.add_experts_(residual, x, torch.tensor([[0, 1], [2, E]]), torch.rand(2, 2),
                                             bank.w_in, bank.w_out, native.ACTIVATION_CODES["gelu"])
    assert torch.equal(residual, before)
    version = residual._version
    with torch.no_grad():
        add_experts_(residual, x, torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2), bank)
    assert residual._version > version  # autograd sees the in-place write


@pytest.mark.parametrize("variant", ["topk", "aux-free"])
def test_generation_with_split_decode_products_matches_recomputation(monkeypatch, variant):
    """End to end with the helper thread taking half of every decode step's experts and output head (the
    threshold lowered so that a tiny model's products split): cached generation still gives recomputation's
    tokens, and the same tokens as unsplit decode steps."""
    from test_sample import tiny_model

    from moegpt.generate import generate

    model = tiny_model(variant, block_size=32)
    prompt = [1, 2, 3, 4]
    unsplit = generate(model, prompt, 40, temperature=0, use_cache=True).tokens_BL
    monkeypatch.setattr(native, "DECODE_SPLIT_VALUES", 1)
    with KernelSplits() as spy:
        cached = generate(model, prompt, 40, temperature=0, use_cache=True).tokens_BL
    assert spy.seen and all(spy.seen)  # every decode kernel call split
    recomputed = generate(model, prompt, 40, temperature=0, use_cache=False).tokens_BL
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, unsplit)
