"""Export a trained run as a Hugging Face transformers model folder (safetensors weights, tokenizer.json).

One mapping per target architecture, each in its own module and registered in `mapping.MAPPINGS`;
`export_run` picks the one that reproduces the model exactly or refuses (ExportRefused, nothing written).
Exporting needs only safetensors; `verify.verify_export` (loading the folder back) needs transformers.
"""

# each mapping module registers itself in MAPPINGS (no two accept the same model)
from moegpt.export import (  # noqa: F401
    deepseek_v2,
    deepseek_v3,
    gpt2,
    llama,
    mixtral,
    qwen2_moe,
)
from moegpt.export.mapping import MAPPINGS, ExportRefused, Mapping, choose_mapping
from moegpt.export.writer import ExportResult, export_run

__all__ = ["MAPPINGS", "ExportRefused", "ExportResult", "Mapping", "choose_mapping", "export_run"]
