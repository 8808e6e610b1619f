"""Export to transformers, one trained run per exact mapping: transformers' model built from the exported files
alone reproduces logits, greedy generation and tokenization; the safetensors file, the card, verify_export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from export_helpers import BLOCK_SIZE, train_run
from safetensors.torch import load_file, save_file

from moegpt.data import TokenDataset, prepare_dataset
from moegpt.export import export_run
from moegpt.generate import generate
from moegpt.runs import load_run

# transformers builds DeepSeek-V3's shared-expert MLP even with none (n_shared_experts = 0): empty weights
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore:Initializing zero-element")]
LLAMA = ["--set", "model.arch=llama"]
MLA = [*LLAMA, "--set", "model.attention=mla", "--set", "model.kv_lora_rank=16", "--set", "model.qk_nope_head_dim=8",
       "--set", "model.qk_rope_head_dim=4", "--set", "model.v_head_dim=8"]
# case -> (data, train flags, transformers class)
CASES = {
    "char-gelu": ("tiny", ["--moe", "dense", "--activation", "gelu"], "GPT2LMHeadModel"),
    "char-relu-bias": ("tiny", ["--moe", "dense", "--activation", "relu", "--set", "model.bias=true",
                                "--set", "model.tie_embeddings=false"], "GPT2LMHeadModel"),
    "bpe-gelu": ("bpe", ["--moe", "dense", "--activation", "gelu"], "GPT2LMHeadModel"),
    "llama-dense": ("tiny", [*LLAMA, "--moe", "dense"], "LlamaForCausalLM"),
    "mixtral": ("bpe", [*LLAMA, "--moe", "topk", "--set", "model.tie_embeddings=false"], "MixtralForCausalLM"),
    # expert width 43 (128 / 3): transformers' grouped-matmul kernel cannot take it, the export names the loop
    "qwen2-moe": ("tiny", [*LLAMA, "--moe", "shared", "--set", "moe.shared_gate=true", "--set", "moe.first_dense=1",
                           "--set", "moe.normalize_topk=false"], "Qwen2MoeForCausalLM"),
    "deepseek-v3": ("tiny", [*MLA, "--moe", "aux-free", "--n-expert", "8", "--set", "moe.n_group=2",
                             "--set", "moe.topk_group=1", "--set", "moe.routed_scaling_factor=2.5",
                             "--set", "model.q_lora_rank=12", "--set", "moe.first_dense=1"], "DeepseekV3ForCausalLM"),
    "deepseek-v3-dense": ("tiny", [*MLA, "--moe", "dense"], "DeepseekV3ForCausalLM"),
    "deepseek-v2": ("tiny", [*MLA, "--moe", "shared", "--set", "moe.normalize_topk=false", "--set", "moe.first_dense=1",
                             "--set", "moe.routed_scaling_factor=1.5"], "DeepseekV2ForCausalLM"),
}


@pytest.fixture(scope="module")
def data_roots(tiny_data, tmp_path_factory):
    """data name -> data root: tiny_data's char corpus, and the same kind of text with a small byte-level BPE."""
    from conftest import write_text_corpus

    bpe_root = tmp_path_factory.mktemp("bpe_data")
    prepare_dataset(source=str(write_text_corpus(tmp_path_factory.mktemp("bpe_corpus"))), name="bpe",
                    data_root=str(bpe_root), tokenizer="bpe", vocab_size=400, val_fraction=0.1, seed=0)
    return {"tiny": tiny_data, "bpe": bpe_root}


@pytest.fixture(scope="module")
def exports(data_roots, tmp_path_factory):
    """case -> (run folder, export folder)."""
    runs, outs = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("exports")
    made = {}
    for name, (data, flags, _) in CASES.items():
        run = train_run(data_roots[data], data, runs, name, *flags)
        export_run(load_run(run), outs / name)
        made[name] = (run, outs / name)
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_reproduces_the_run(exports, case):
    transformers = pytest.importorskip("transformers")
    run_dir, out = exports[case]
    run = load_run(run_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert type(model).__name__ == CASES[case][2]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    ds = TokenDataset(run.prepared_data_dir())
    x, _ = ds.get_batch("val", 4, BLOCK_SIZE, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = run.model(x, all_logits=True).logits, model(x).logits
        assert (ours - theirs).abs().max() <= 1e-4
        prompt = x[:1, :8]
        expected = generate(run.model, prompt, 32, temperature=0.0).tokens_BL
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert got.tolist() == expected.tolist() and len(set(expected[0, 8:].tolist())) > 1

    tok, hf_tok = run.tokenizer(), transformers.AutoTokenizer.from_pretrained(str(out))
    text = tok.decode(ds.tokens("train")[:3000].tolist()).split("<|endoftext|>")[0]
    assert hf_tok.encode(text) == tok.encode(text) and len(text) > 500
    assert hf_tok.eos_token_id == tok.eot_id == model.generation_config.eos_token_id


def test_weights_are_plain_safetensors(exports):
    run_dir, out = exports["char-relu-bias"]
    tensors = load_file(str(out / "model.safetensors"))
    n_layer = load_run(run_dir).config.model.n_layer
    per_layer = {f"{part}.{kind}" for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                 for kind in ("weight", "bias")}
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
                "lm_head.weight"}  # an untied head
    expected |= {f"transformer.h.{i}.{name}" for i in range(n_layer) for name in per_layer}
    assert set(tensors) == expected and all(t.dtype == torch.float32 for t in tensors.values())
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    # experts are written one by one, as published Mixtral checkpoints are
    tensors = load_file(str(exports["mixtral"][1] / "model.safetensors"))
    assert tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (64, 32)
    assert tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (32, 64)


def test_config_and_card(exports):
    run_dir, out = exports["char-gelu"]
    run = load_run(run_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu"
    assert config["n_positions"] == BLOCK_SIZE and config["tie_word_embeddings"] is True
    card = (out / "README.md").read_text()
    counts = run.model.num_params()
    for fragment in (f"{run.state['step']} steps", "validation cross-entropy", "dense gelu FFN",
                     f"{counts['total']:,} total", f"{counts['active']:,} active", "`tiny`, char tokenizer"):
        assert fragment in card, fragment
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == run.tokenizer().eot_id


def swap_gate_and_up(tensors):  # SwiGLU's two input matrices in the wrong roles
    for name in [n for n in tensors if n.endswith(".w1.weight")]:
        up = name.replace(".w1.", ".w3.")
        tensors[name], tensors[up] = tensors[up], tensors[name]


def drop_selection_bias(tensors):  # DeepSeek-V3 choosing experts without e_score_correction_bias
    for name in [n for n in tensors if n.endswith("e_score_correction_bias")]:
        tensors[name] = torch.zeros_like(tensors[name])


def open_shared_gate(tensors):  # Qwen2-MoE's shared expert at a constant sigmoid(0) = 0.5
    for name in [n for n in tensors if n.endswith("shared_expert_gate.weight")]:
        tensors[name] = torch.zeros_like(tensors[name])


def rotary_key_pairs_in_half_split_order(tensors):  # DeepSeek-V2 rotates interleaved pairs
    for name in [n for n in tensors if n.endswith("kv_a_proj_with_mqa.weight")]:
        rank = 16  # model.kv_lora_rank of the MLA cases; rows rank.. hold the rotary key
        rows = tensors[name].clone()
        rows[[rank + 1, rank + 2]] = rows[[rank + 2, rank + 1]]
        tensors[name] = rows


def scale_one_weight(tensors):
    tensors["transformer.h.1.mlp.c_proj.weight"] *= 1.01


@pytest.mark.parametrize("case, corrupt", [("char-gelu", scale_one_weight), ("mixtral", swap_gate_and_up),
                                           ("deepseek-v3", drop_selection_bias), ("qwen2-moe", open_shared_gate),
                                           ("deepseek-v2", rotary_key_pairs_in_half_split_order)])
def test_verify_export_passes_and_catches_a_wrong_convention(exports, tmp_path, case, corrupt):
    pytest.importorskip("transformers")
    from moegpt.export.verify import verify_export

    run_dir, out = exports[case]
    run = load_run(run_dir)
    report = verify_export(out, run)
    assert report.passed and report.greedy_tokens == 32 and report.tokenizer_tokens > 0, report.summary()
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    corrupt(tensors)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    report = verify_export(broken, run)
    assert not report.passed and report.max_logit_diff > 1e-4 and not report.loading_problems
