"""The llama trunk with MHA and MLA end to end: causality, cached == uncached generation (tokens and
logits) also past block_size, untied head, accounting, and bad keys as one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.checkpoint import load_checkpoint
from moegpt.cli.main import app
from moegpt.config import ModelConfig, MoEConfig
from moegpt.generate import generate
from moegpt.inspect.causality import probe_causality
from moegpt.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")
TRUNKS = [("llama", "mha"), ("llama", "mla")]
MOES = [{"variant": "topk"}, {"variant": "aux-free", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.0,
                              "normalize_topk": False},
        {"variant": "shared", "shared_gate": True, "first_dense": 1}]


def model(attention: str, moe: dict, block_size: int = 12, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, block_size=block_size, n_layer=2, n_head=2, n_embd=32, arch="llama",
                      attention=attention, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      **kw)
    moe_cfg = MoEConfig(**{"n_expert": 4, "top_k": 2, **moe})
    assert not cfg.problems() and not moe_cfg.problems(), cfg.problems() + moe_cfg.problems()
    net = GPT(cfg, moe_cfg)
    for p in net.parameters():  # sharper weights than the init, so greedy paths are not flat
        p.data.add_(torch.randn_like(p) * 0.3)
    return net.eval()


@pytest.mark.parametrize(("arch", "attention"), TRUNKS)
@pytest.mark.parametrize("moe", MOES, ids=lambda m: m["variant"])
def test_suffix_perturbation_finds_no_leak(arch, attention, moe):
    result = probe_causality(model(attention, moe), torch.randint(0, 50, (400,),
                                                                  generator=torch.Generator().manual_seed(0)))
    assert result["causal"], result


def lm_head_logits(net: GPT) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []
    # a forward pass gives the head [B, T, C] (its last position is the prediction), a decode step [B, C]
    handle = net.lm_head.register_forward_hook(
        lambda _m, _i, out: seen.append((out[:, -1] if out.dim() == 3 else out).clone()))
    return seen, handle


@pytest.mark.parametrize("attention", ["mha", "mla"])
@pytest.mark.parametrize("moe", MOES, ids=lambda m: m["variant"])
@pytest.mark.parametrize("keep", [6, 12])
def test_cached_generation_equals_uncached_past_block_size(attention, moe, keep):
    net = model(attention, moe)
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    runs = {}
    for use_cache in (True, False):
        seen, handle = lm_head_logits(net)
        try:
            gen = generate(net, prompt, 30, temperature=0, use_cache=use_cache, context_keep=keep)
        finally:
            handle.remove()
        runs[use_cache] = (gen.tokens_BL, torch.stack(seen))
    assert runs[True][0].shape == (2, 35)  # well past block_size 12: the window slid several times
    assert torch.equal(runs[True][0], runs[False][0])
    # 1e-5 of the logits' scale (fp32): one token and a whole window go through GEMMs of different shapes,
    # which sum in different orders
    scale = max(1.0, float(runs[False][1].abs().max()))
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-5 * scale, rtol=0)
    assert len(set(runs[True][0][0, 5:].tolist())) > 1


def test_untied_head_has_its_own_weight_and_is_counted():
    tied, untied = model("mla", {"variant": "dense"}), model("mla", {"variant": "dense"}, tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert "lm_head.weight" in untied.state_dict() and untied.wpe is None
    assert untied.num_params()["total"] - tied.num_params()["total"] == 50 * 32
    assert untied.flops_per_token() == tied.flops_per_token()


def test_mla_cache_is_smaller_than_mha():
    assert model("mla", {"variant": "dense"}).kv_cache_bytes_per_token() == 4 * 2 * (12 + 4)
    assert model("mha", {"variant": "dense"}).kv_cache_bytes_per_token() == 4 * 2 * 2 * 32


@pytest.mark.parametrize(("sets", "fragment"), [
    (["model.arch=llama", "model.attention=mla", "model.kv_lora_rank=0"], "kv_lora_rank must be > 0"),
    (["model.attention=mla"], "needs model.arch = 'llama'"),
    (["model.arch=llama", "model.attention=mla", "model.qk_rope_head_dim=3"], "qk_rope_head_dim must be even"),
    (["model.arch=llama", "model.n_embd=36", "model.n_head=4"], "must be even"),
    (["model.arch=llama", "model.n_embd=30", "model.n_head=4"], "divisible by model.n_head"),
    (["model.arch=llama", "model.bias=true"], "no biases"),
    (["model.arch=bert"], "unknown model.arch"),
    (["model.attention=gqa"], "unknown model.attention"),
    (["moe.routed_scaling_factor=0"], "routed_scaling_factor"),
])
def test_bad_trunk_keys_are_one_line_errors(sets, fragment):
    args = ["params", "--preset", "tiny"] + [a for s in sets for a in ("--set", s)]
    assert_one_line_error(CliRunner().invoke(app, args), fragment)


def test_mla_head_dims_need_not_divide_n_embd():
    cfg = ModelConfig(n_embd=30, n_head=4, arch="llama", attention="mla")
    assert cfg.problems() == []


LLAMA_MLA_SETS = ["model.arch=llama", "model.attention=mla", "moe.variant=aux-free", "moe.routed_scaling_factor=2.0",
                  "moe.first_dense=1", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
                  "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.q_lora_rank=12",
                  "model.tie_embeddings=false"]


@pytest.mark.slow
def test_llama_mla_trains_in_a_subprocess_then_resumes_samples_and_audits(tiny_data, tmp_path):
    sets = [a for s in LLAMA_MLA_SETS + [f"train.runs_root={tmp_path}", f"data.data_root={tiny_data}",
                                         "data.name=tiny"] for a in ("--set", s)]
    trained = subprocess.run([sys.executable, "-m", "moegpt.cli", "train", "--preset", "tiny", "--name", "ds",
                              "--max-iters", "4", "--ckpt-interval", "2", *sets],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stderr
    resumed = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "ds" / "config.toml"), "--name", "ds",
                                       "--resume", "--max-iters", "6", "--ckpt-interval", "2"])
    assert resumed.exit_code == 0, resumed.output
    state = load_checkpoint(tmp_path / "ds" / "ckpt" / "step_000006.pt")
    assert "blocks.0.attn.kv_b_proj.weight" in state["model"] and "wpe.weight" not in state["model"]
    sample = CliRunner().invoke(app, ["sample", str(tmp_path / "ds"), "--max-new-tokens", "40", "--seed", "0"])
    assert sample.exit_code == 0 and "KV cache" in sample.stderr, sample.output
    audit = CliRunner().invoke(app, ["inspect-routing", str(tmp_path / "ds"), "--causality"])
    assert audit.exit_code == 0 and "causal" in audit.stdout and "leaks" not in audit.stdout, audit.output
