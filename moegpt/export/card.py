"""The exported folder's README.md (model card) and generation_config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moegpt import __version__
from moegpt.moe import experts_per_token
from moegpt.runs import LoadedRun
from moegpt.safe_io import read_step_records
from moegpt.tokenizer import Tokenizer

# moegpt sample's defaults, so that `generate(do_sample=True)` draws like `moegpt sample`
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 200


def generation_config(eot_id: int, block_size: int) -> dict[str, Any]:
    return {"bos_token_id": eot_id, "eos_token_id": eot_id, "max_length": block_size,
            "do_sample": True, "temperature": SAMPLE_TEMPERATURE, "top_k": SAMPLE_TOP_K}


def val_ce_at(run_dir: Path, step: int) -> float | None:
    """The validation cross-entropy the run logged at `step` (metrics.jsonl), if it evaluated there."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for record in read_step_records(path)[0]:
        if record["step"] == step and "val_ce" in record:
            found = record["val_ce"]
    return found


def facts_table(run: LoadedRun, tok: Tokenizer) -> list[str]:
    """The card's table: data, training, validation loss, shape, parameters, optimiser, checkpoint."""
    cfg, state = run.config, run.state
    m, e, t = cfg.model, cfg.moe, cfg.train
    counts = run.model.num_params()
    step = int(state.get("step", 0))
    val = val_ce_at(run.run_dir, step)
    val_text = f"{val:.4f} nats/token (at step {step})" if val is not None else "not evaluated at this step"
    tokens = state.get("data_state", {}).get("tokens_seen")
    ffn = f"dense {e.activation} FFN" if not run.model.moe_layers else \
        f"{e.variant} MoE, {e.n_expert} experts, {experts_per_token(e, m.block_size):g} per token, {e.activation}"
    return [
        "| | |", "|---|---|",
        f"| data | `{cfg.data.name}`, {tok.kind} tokenizer, {tok.vocab_size} tokens |",
        f"| training | {step} steps" + (f", {tokens:,} tokens" if tokens else "") + " |",
        f"| validation cross-entropy | {val_text} |",
        f"| model | {m.arch} trunk, {m.attention.upper()} attention, {m.n_layer} layers x {m.n_embd} wide x "
        f"{m.n_head} heads, context {m.block_size}, {ffn} |",
        f"| parameters | {counts['total']:,} total, {counts['active']:,} active per token |",
        f"| optimiser | AdamW lr {t.lr:g} (cosine to {t.min_lr_ratio:g}x, {t.warmup_iters} warmup steps), "
        f"batch {t.batch_size} x {t.grad_accum} x {m.block_size} tokens, weight decay {t.weight_decay:g}, "
        f"precision {t.precision}, seed {t.seed} |",
        f"| checkpoint | `{run.checkpoint.name}` of the run |",
    ]


def model_card(run: LoadedRun, tok: Tokenizer, architecture: str, folder_name: str) -> str:
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [moegpt]", "---", "",
        f"# {run.run_dir.name}", "",
        f"A small language model trained with moegpt {__version__} and exported as `{architecture}`.", "",
        *facts_table(run, tok), "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{folder_name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{folder_name}")',
        'ids = tok("def ", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))",
        "```", "",
        f"`<|endoftext|>` (id {tok.eot_id}) separates documents and ends generation. The model was trained on "
        f"{run.config.model.block_size} tokens of context.",
        "The full training configuration is in `moegpt_config.json`.", "",
    ]
    return "\n".join(lines)
