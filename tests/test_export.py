"""Export to transformers: exact mappings (logits, greedy generation, tokenizer, against the files alone),
refusals of what has no exact target, the safetensors file, the model card and verify_export's verdicts."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import BLOCK_SIZE, train_run
from safetensors.torch import load_file, save_file

from moegpt.config import ModelConfig, MoEConfig
from moegpt.data import TokenDataset, prepare_dataset
from moegpt.errors import MoegptError
from moegpt.export import ExportRefused, choose_mapping, export_run
from moegpt.export.gpt2 import GPT2Mapping
from moegpt.model import GPT
from moegpt.runs import load_run

pytestmark = pytest.mark.usefixtures("single_thread")
GPT2_RUNS = {"char-gelu": ("tiny", ["--moe", "dense", "--activation", "gelu"]),
             "char-relu-bias": ("tiny", ["--moe", "dense", "--activation", "relu", "--set", "model.bias=true"]),
             "bpe-gelu": ("bpe", ["--moe", "dense", "--activation", "gelu"])}


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
    """name -> (run folder, export folder) for every gpt2 mapping case."""
    runs, outs = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("exports")
    made = {}
    for name, (data, flags) in GPT2_RUNS.items():
        run = train_run(data_roots[data], data, runs, name, *flags)
        export_run(load_run(run), outs / name)
        made[name] = (run, outs / name)
    return made


@pytest.mark.parametrize("case", list(GPT2_RUNS))
def test_transformers_reproduces_the_run(exports, case):
    transformers = pytest.importorskip("transformers")
    run_dir, out = exports[case]
    run = load_run(run_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    ds = TokenDataset(run.existing_data_dir())
    x, _ = ds.get_batch("val", 4, BLOCK_SIZE, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = run.model(x, all_logits=True).logits, model(x).logits
        assert (ours - theirs).abs().max() <= 1e-4
        prompt = x[:1, :8]
        expected = run.model.generate(prompt, 32, temperature=0.0)
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
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    expected |= {f"transformer.h.{i}.{name}" for i in range(n_layer) for name in per_layer}
    assert set(tensors) == expected and all(t.dtype == torch.float32 for t in tensors.values())
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


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


def test_verify_export_passes_and_catches_a_wrong_weight(exports, tmp_path):
    pytest.importorskip("transformers")
    from moegpt.export.verify import verify_export

    run_dir, out = exports["char-gelu"]
    run = load_run(run_dir)
    report = verify_export(out, run)
    assert report.passed and report.greedy_tokens == 32 and report.tokenizer_tokens > 0, report.summary()
    broken = tmp_path / "broken"
    export_run(run, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["transformer.h.1.mlp.c_proj.weight"] *= 1.01
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    report = verify_export(broken, run)
    assert not report.passed and report.max_logit_diff > 1e-4 and not report.loading_problems


def gpt(variant: str = "dense", activation: str = "gelu", **moe) -> GPT:
    return GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16),
               MoEConfig(variant=variant, activation=activation, n_expert=4, top_k=2, **moe))


@pytest.mark.parametrize("variant", ["topk", "noisy-topk", "switch", "shared", "expert-choice", "soft", "aux-free",
                                     "basic"])
def test_moe_on_the_gpt2_trunk_is_refused(variant):
    with pytest.raises(ExportRefused, match=f"{variant} MoE layers on the gpt2 trunk.*nearest exportable: .*gelu"):
        choose_mapping(gpt(variant))


@pytest.mark.parametrize("activation", ["swiglu", "linear"])
def test_dense_ffn_gpt2_cannot_express_is_refused(activation):
    with pytest.raises(ExportRefused, match=f"no {activation} FFN.*nearest exportable"):
        choose_mapping(gpt("dense", activation))


def test_moe_config_whose_layers_are_all_dense_exports():
    model = gpt("topk", "relu", first_dense=2)  # layers 0 and 1 dense: no MoE layer at all
    assert isinstance(choose_mapping(model), GPT2Mapping)


def test_a_weight_no_mapping_places_stops_the_export():
    model = gpt()
    model.blocks[0].extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(MoegptError, match="does not place these weights: blocks.0.extra"):
        GPT2Mapping().hf_weights(model)
