"""The gpt2 trunk stays bit-identical to the code before the llama trunk / MLA were added.

Every expected value below was RECORDED from the pre-change code (commit b8d703a, torch CPU, one thread):
the initial state_dict (names and a float64 checksum), four AdamW steps' losses (exact float hex) and a
greedy continuation. Any change to the gpt2 trunk's initialisation order, numerics or names breaks them.
The losses are compared to a few float32 ulps: the CPU's own matmul kernels (AVX2, AVX-512, AMX) round the
same sums differently, which moves the last bits and nothing more; a change to the trunk moves them by far more.
"""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.generate import generate
from moegpt.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")

RECORDED = {
    "dense": (["0x1.0ab4640000000p+2", "0x1.09979c0000000p+2", "0x1.0ca35c0000000p+2", "0x1.0f05100000000p+2"],
              "0x1.51861c5541942p+9"),
    "topk": (["0x1.0a32c60000000p+2", "0x1.08d7020000000p+2", "0x1.0ce4720000000p+2", "0x1.0c13b60000000p+2"],
             "0x1.f7eb0768cb6aap+9"),
    "aux-free": (["0x1.0a32e60000000p+2", "0x1.08d4ca0000000p+2", "0x1.0ce2b60000000p+2", "0x1.0c0af40000000p+2"],
                 "0x1.f7eb0768cb6aap+9"),
}
RECORDED_GREEDY = [1, 2, 3] + [18] * 20
RECORDED_KEYS_PER_BLOCK = {"attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.bias", "attn.c_proj.weight",
                           "ln_1.bias", "ln_1.weight", "ln_2.bias", "ln_2.weight"}
RECORDED_TOP_KEYS = {"lm_head.weight", "ln_f.bias", "ln_f.weight", "wpe.weight", "wte.weight"}


def build(variant: str) -> GPT:
    torch.manual_seed(1234)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True),
               MoEConfig(variant=variant, n_expert=4, top_k=2))


@pytest.mark.parametrize("variant", RECORDED)
def test_gpt2_trunk_init_losses_and_greedy_tokens_are_unchanged(variant):
    losses, checksum = RECORDED[variant]
    model = build(variant)
    state = model.state_dict()
    assert sum(p.double().abs().sum() for p in state.values()).item().hex() == checksum
    keys = {k for k in state if not k.startswith("blocks.")}
    assert keys == RECORDED_TOP_KEYS
    block_keys = {k.split(".", 2)[2] for k in state if k.startswith("blocks.0.") and ".ffn." not in k}
    assert block_keys == RECORDED_KEYS_PER_BLOCK
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    seen = []
    for _ in range(4):
        idx = torch.randint(0, 64, (3, 17), generator=g)
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        for block in model.blocks:
            if hasattr(block.ffn, "update_bias"):
                block.ffn.update_bias()
        seen.append(out.loss.item())
    assert seen == pytest.approx([float.fromhex(h) for h in losses], rel=2e-6, abs=0)
    assert generate(model, torch.tensor([[1, 2, 3]]), 20, temperature=0).tokens_BL.tolist() == [RECORDED_GREEDY]


def test_gpt2_trunk_accounting_keeps_the_nanogpt_formulas():
    model = build("topk")
    n, cfg = model.num_params(), model.config
    assert n["embedding"] == (cfg.vocab_size + cfg.block_size) * cfg.n_embd
    expected = 6 * (n["active_non_embedding"] + cfg.n_embd * cfg.vocab_size) \
        + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert model.flops_per_token() == expected
    assert model.kv_cache_bytes_per_token() == 4 * cfg.n_layer * 2 * cfg.n_embd
