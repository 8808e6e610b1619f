"""Sampling: KV cache == recomputation for every causal variant, sliding window, streaming UTF-8,
routing capture vs a direct forward pass, seed determinism, and CLI bad input."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import train_tiny
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.config import ModelConfig, MoEConfig
from moegpt.generate import Utf8StreamDecoder, generate, generate_steps, sampling_problems
from moegpt.model import GPT
from moegpt.moe import VARIANTS, is_causal_variant

runner = CliRunner()
CAUSAL = [v for v in VARIANTS if is_causal_variant(v)]
NON_CAUSAL = [v for v in VARIANTS if not is_causal_variant(v)]


def tiny_model(variant: str, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    # capacity large enough that nothing is ever dropped: drops legitimately differ between a cached
    # step (one token routed) and a recomputed window (see moegpt.generate)
    moe = MoEConfig(variant=variant, n_expert=4, top_k=2, capacity_factor=100.0 if variant == "switch" else -1.0)
    model = GPT(ModelConfig(vocab_size=50, block_size=block_size, n_layer=2, n_head=2, n_embd=32), moe)
    for p in model.parameters():  # sharper weights than the init, so greedy paths are not trivially flat
        p.data.add_(torch.randn_like(p) * 0.3)
    return model.eval()


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("variant", CAUSAL)
def test_greedy_cache_equals_recompute(variant):
    model = tiny_model(variant)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    cached = generate(model, prompt, 12, temperature=0, use_cache=True)
    full = generate(model, prompt, 12, temperature=0, use_cache=False)
    assert cached.used_cache and not full.used_cache
    assert torch.equal(cached.tokens_BL, full.tokens_BL)
    assert len(set(cached.tokens_BL[0, 5:].tolist())) > 1  # not a degenerate constant stream


@pytest.mark.parametrize("variant", ["topk", "dense"])
def test_generation_past_block_size(variant):
    model = tiny_model(variant, block_size=8)
    prompt = torch.tensor([[1, 2, 3]])
    for keep in (4, 8):  # default-style sliding and nanoGPT's crop
        cached = generate(model, prompt, 20, temperature=0, use_cache=True, context_keep=keep)
        full = generate(model, prompt, 20, temperature=0, use_cache=False, context_keep=keep)
        assert cached.tokens_BL.shape == (1, 23)
        assert torch.equal(cached.tokens_BL, full.tokens_BL)


@pytest.mark.parametrize("variant", NON_CAUSAL)
def test_non_causal_variants_recompute(variant):
    model = tiny_model(variant)
    with pytest.warns(UserWarning, match="not causal"):
        out = generate(model, torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert not out.used_cache and out.tokens_BL.shape == (1, 8)


def test_library_generate_and_seed_determinism():
    model = tiny_model("topk")
    prompt = torch.tensor([[7, 8, 9]])
    a = generate(model, prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(5)).tokens_BL
    b = generate(model, prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(5)).tokens_BL
    c = generate(model, prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(6)).tokens_BL
    assert torch.equal(a, b) and a.shape == (1, 13)
    assert not torch.equal(a, c)


def test_generated_tokens_can_feed_a_training_step():
    """Generation runs under inference_mode; what it returns must still be an ordinary tensor."""
    model = tiny_model("topk")
    tokens = generate(model, torch.tensor([[1, 2, 3]]), 6, temperature=0).tokens_BL
    assert not tokens.is_inference()
    model.train()
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


def test_captured_routing_matches_direct_forward():
    model = tiny_model("topk")
    gen = generate(model, torch.tensor([[2, 7, 1, 8]]), 8, temperature=0, capture_routing=True)
    with torch.no_grad():
        stats = model(gen.tokens_BL, all_logits=True).router_stats
    for layer in model.moe_layers:
        routed = gen.routing[layer]
        direct = stats[layer].expert_idx_NK.reshape(1, gen.tokens_BL.shape[1], -1)
        assert torch.equal(routed.expert_idx_BTK, direct)
        weights = stats[layer].expert_weight_NK.reshape(direct.shape)
        assert torch.allclose(routed.expert_weight_BTK, weights, atol=1e-6)


def test_decode_steps_run_on_one_thread_and_the_thread_count_is_restored_between_tokens(monkeypatch):
    model = tiny_model("topk")
    in_blocks, in_head = [], []
    block_decode, head_forward = model.blocks[0].decode, model.lm_head.forward

    def block_spy(*args):
        in_blocks.append(torch.get_num_threads())
        return block_decode(*args)

    def head_spy(x):
        in_head.append(torch.get_num_threads())
        return head_forward(x)

    monkeypatch.setattr(model.blocks[0], "decode", block_spy)
    monkeypatch.setattr(model.lm_head, "forward", head_spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        during = [torch.get_num_threads() for _ in generate_steps(model, [1, 2, 3], 4, temperature=0)]
    finally:
        torch.set_num_threads(threads)
    assert in_blocks == [1, 1, 1]  # three decode steps (the prompt's pass is a forward)
    assert in_head == [2, 1, 1, 1]  # the prompt's pass keeps every thread, the decode steps' heads do not
    assert during == [2] * 5  # the caller's code between tokens keeps its threads


class ByteTokenizer:
    """Token id = one byte: the worst case for splitting multi-byte characters."""

    def decode_bytes(self, ids):
        return bytes(ids)


def test_stream_decoder_never_splits_a_character():
    text = "héllo → 世界 🙂!"
    decoder = Utf8StreamDecoder(ByteTokenizer())
    pieces = [decoder.feed([b]) for b in text.encode()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert any(p == "" for p in pieces)  # continuation bytes were held back, not printed


# ---- CLI --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def char_run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = train_tiny(tiny_data, runs, "s", steps=3)
    assert result.exit_code == 0, result.output
    return runs / "s"


def test_cli_sample_is_deterministic_for_a_seed(char_run):
    args = ["sample", str(char_run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3", "--no-stream"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.startswith("def ")
    assert "tokens/s" in first.stderr


def test_cli_routing_json(char_run, tmp_path):
    path = tmp_path / "route.json"
    result = runner.invoke(app, ["sample", str(char_run), "--prompt", "for ", "--max-new-tokens", "6", "--seed", "1",
                                 "--show-routing", "--routing-json", str(path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    sample = doc["samples"][0]
    assert sample["prompt_tokens"] == 4 and len(sample["tokens"]) == 10
    for token in sample["tokens"]:
        assert [r["layer"] for r in token["routing"]] == doc["moe_layers"]
        for r in token["routing"]:
            assert len(r["experts"]) == 2 and all(0 <= e < doc["n_expert"] for e in r["experts"])
            assert abs(sum(r["weights"]) - 1) < 1e-4  # top-k renormalised
    assert "routing: top-1 expert" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--sample-top-k", "-1"], "--sample-top-k"), (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt", "€ 漢"], "outside this run's char vocabulary"), (["--prompt", "x" * 100], "block_size"),
    (["--show-routing", "7"], "not a MoE layer"),
])
def test_cli_bad_input(char_run, args, fragment):
    result = runner.invoke(app, ["sample", str(char_run), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error:") and fragment in lines[0], result.stderr


def test_sampling_cutoff_is_sample_top_k_and_top_k_stays_a_train_flag(char_run):
    # --top-k means experts per token in `train`; `sample` spells its cutoff --sample-top-k
    old = runner.invoke(app, ["sample", str(char_run), "--top-k", "5", "--max-new-tokens", "2"])
    assert old.exit_code == 2 and "--top-k" in old.stderr
    new = runner.invoke(app, ["sample", str(char_run), "--sample-top-k", "5", "--max-new-tokens", "2", "--seed", "1"])
    assert new.exit_code == 0, new.output
    assert "--sample-top-k" in runner.invoke(app, ["sample", "--help"]).output


def test_library_sampling_errors_name_parameters_not_flags():
    problems = sampling_problems(temperature=-1.0, top_k=-1, top_p=0.0, max_new_tokens=-1)
    assert set(problems) == {"temperature", "top_k", "top_p", "max_new_tokens"}
    assert not any("--" in what for what in problems.values())


def test_cli_missing_and_corrupt_checkpoint(char_run, tmp_path):
    missing = runner.invoke(app, ["sample", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and missing.stderr.startswith("moegpt: error:")
    bad = tmp_path / "bad.pt"
    good = sorted((char_run / "ckpt").glob("step_*.pt"))[-1]
    bad.write_bytes(good.read_bytes()[:-50])
    corrupt = runner.invoke(app, ["sample", str(bad)])
    assert corrupt.exit_code == 2 and "checkpoint corrupt" in corrupt.stderr
