"""Multi-head Latent Attention (moegpt/mla.py) and the llama trunk's blocks, against transformers'
DeepseekV3 / Llama modules built from a config (no downloads), and the absorbed decode against the plain form."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.mla import MultiHeadLatentAttention, kv_cache_values_per_token
from moegpt.model import GPT, Block, KVCache

pytestmark = pytest.mark.usefixtures("single_thread")

DIMS = {"n_embd": 32, "n_head": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        "v_head_dim": 6, "block_size": 32, "rope_theta": 10000.0, "norm_eps": 1e-6}


def mla_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(**{"vocab_size": 64, "n_layer": 2, "arch": "llama", "attention": "mla", **DIMS, **kw})
    assert not cfg.problems(), cfg.problems()
    return cfg


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def causal_mask(T: int) -> torch.Tensor:
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


def hf_deepseek_config(q_lora_rank: int, intermediate: int = 48):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=64, hidden_size=DIMS["n_embd"], num_attention_heads=DIMS["n_head"],
        num_key_value_heads=DIMS["n_head"], q_lora_rank=q_lora_rank or None, kv_lora_rank=DIMS["kv_lora_rank"],
        qk_nope_head_dim=DIMS["qk_nope_head_dim"], qk_rope_head_dim=DIMS["qk_rope_head_dim"],
        v_head_dim=DIMS["v_head_dim"], rope_interleave=False, max_position_embeddings=DIMS["block_size"],
        rms_norm_eps=DIMS["norm_eps"], intermediate_size=intermediate, first_k_dense_replace=1, num_hidden_layers=1,
        attention_bias=False)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_equals_transformers_deepseek_v3_attention(q_lora_rank):
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    config = hf_deepseek_config(q_lora_rank)
    theirs = modeling.DeepseekV3Attention(config, layer_idx=0).eval()
    randomize(theirs)
    ours = MultiHeadLatentAttention(mla_cfg(q_lora_rank=q_lora_rank)).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    rope = modeling.DeepseekV3RotaryEmbedding(config)
    position_embeddings = rope(x, torch.arange(11)[None])
    expected, _ = theirs(x, position_embeddings, causal_mask(11))
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_llama_trunk_mla_block_equals_transformers_deepseek_v3_decoder_layer():
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    config = hf_deepseek_config(0, intermediate=48)
    theirs = modeling.DeepseekV3DecoderLayer(config, layer_idx=0).eval()  # layer 0 < first_k_dense_replace: dense
    randomize(theirs)
    ours = Block(mla_cfg(ffn_hidden=48), MoEConfig(variant="dense"), 0).eval()
    state = {k.replace("self_attn.", "attn."): v for k, v in theirs.state_dict().items() if ".mlp." not in k
             and not k.startswith("mlp.")}
    state = {k.replace("input_layernorm", "ln_1").replace("post_attention_layernorm", "ln_2"): v
             for k, v in state.items()}
    mlp = theirs.mlp
    state["ffn.mlp.w_in"] = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).t()
    state["ffn.mlp.w_out"] = mlp.down_proj.weight.t()
    ours.load_state_dict(state)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    position_embeddings = modeling.DeepseekV3RotaryEmbedding(config)(x, torch.arange(9)[None])
    expected = theirs(x, attention_mask=causal_mask(9), position_embeddings=position_embeddings)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(ours(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_llama_trunk_mha_block_equals_transformers_llama_decoder_layer():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                         max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                         mlp_bias=False)
    config._attn_implementation = "eager"
    theirs = modeling.LlamaDecoderLayer(config, layer_idx=0).eval()
    randomize(theirs)
    ours = Block(ModelConfig(n_embd=32, n_head=4, block_size=32, arch="llama", ffn_hidden=48),
                 MoEConfig(variant="dense"), 0).eval()
    a, mlp = theirs.self_attn, theirs.mlp
    ours.load_state_dict({
        "ln_1.weight": theirs.input_layernorm.weight, "ln_2.weight": theirs.post_attention_layernorm.weight,
        "attn.c_attn.weight": torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)),
        "attn.c_proj.weight": a.o_proj.weight,
        "ffn.mlp.w_in": torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).t(),
        "ffn.mlp.w_out": mlp.down_proj.weight.t()})
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    position_embeddings = modeling.LlamaRotaryEmbedding(config)(x, torch.arange(9)[None])
    expected = theirs(x, attention_mask=causal_mask(9), position_embeddings=position_embeddings)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(ours(x)[0], expected, atol=1e-5, rtol=1e-5)


def decode_logits(model: GPT, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = KVCache()
    with torch.no_grad():
        out = [model(idx[:, :prefill], cache=cache, all_logits=True).logits]
        out += [model(idx[:, t:t + 1], cache=cache).logits for t in range(prefill, idx.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_absorbed_decode_equals_plain_form(q_lora_rank):
    torch.manual_seed(0)
    model = GPT(mla_cfg(q_lora_rank=q_lora_rank), MoEConfig(variant="topk", n_expert=4, top_k=2)).eval()
    randomize(model, seed=4)  # not the tiny init scale: differences must show up if the algebra is wrong
    idx = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(5))
    attns = [b.attn for b in model.blocks]
    for a in attns:
        a.absorb = True
    absorbed = decode_logits(model, idx, prefill=4)
    for a in attns:
        a.absorb = False
    plain = decode_logits(model, idx, prefill=4)
    # fp32 sums in different orders (and the CPU's own matmul kernels): a tolerance by the logits' size
    atol = 1e-5 * plain.abs().max().item()
    torch.testing.assert_close(absorbed, plain, atol=atol, rtol=1e-5)
    with torch.no_grad():
        full = model(idx, all_logits=True).logits
    torch.testing.assert_close(absorbed, full, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_cache_bytes_per_token_equal_the_formula(attention):
    cfg = mla_cfg(attention=attention, n_layer=3)
    model = GPT(cfg, MoEConfig(variant="dense")).eval()
    per_layer = 16 + 4 if attention == "mla" else 2 * 32  # kv_lora_rank + qk_rope_head_dim, or K and V
    assert model.kv_cache_bytes_per_token() == 4 * 3 * per_layer
    assert kv_cache_values_per_token(cfg, attention) * 4 == model.kv_cache_bytes_per_token()
    cache = KVCache()
    with torch.no_grad():
        model(torch.zeros(2, 10, dtype=torch.long), cache=cache)
    assert cache.nbytes() == 2 * 10 * model.kv_cache_bytes_per_token()
