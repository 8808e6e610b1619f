"""Per-run routing analysis: what a trained run's experts do.

- run.py        `inspect_routing`: open a run, collect its routing on held-out tokens, build the report
- heldout.py    which held-out windows are routed and scored (spread over the whole split)
- report.py     accumulators over batches and the per-layer report dicts
- stats.py      pure summaries of RouterStats (load imbalance, drops, entropy, top-1 expert)
- schema.py     the JSON report's schema (moegpt.routing-report v2) and its validator
- history.py    load imbalance over training, read from metrics.jsonl
- causality.py  the suffix-perturbation leak probe and cached-vs-full routing agreement
- plot.py       heatmap PNGs (matplotlib, the [plot] extra)

The router machinery itself lives in moegpt/moe/.
"""
