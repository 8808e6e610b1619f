"""Run configuration (moegpt/config.py) and the precedence rule (moegpt/presets.py)."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from moegpt.config import (
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
    apply_override,
)
from moegpt.errors import MoegptError
from moegpt.moe import ACTIVATIONS, BACKENDS, VARIANTS, validate_run_config, variant_problems
from moegpt.presets import PRESETS, preset_config, resolve_config


def custom_config() -> RunConfig:
    cfg = RunConfig()
    cfg.model.n_layer, cfg.model.dropout, cfg.model.bias = 3, 0.1, True
    cfg.moe.variant, cfg.moe.n_expert, cfg.moe.capacity_factor = "switch", 16, 1.5
    cfg.moe.normalize_topk, cfg.moe.activation = False, "gelu"
    cfg.train.name, cfg.train.lr, cfg.train.compile = "my run", 3e-4, True
    cfg.data.name = "tiny"
    return cfg


def problems_of(**moe_kw) -> str:
    cfg = RunConfig(moe=MoEConfig(**moe_kw))
    return "; ".join(cfg.problems() + variant_problems(cfg.moe))


# ---- strict from_dict ----------------------------------------------------------------------------

def test_defaults_and_every_preset_validate():
    validate_run_config(RunConfig())
    for name in PRESETS:
        validate_run_config(preset_config(name))


def test_unknown_key_raises_naming_it():
    with pytest.raises(MoegptError, match=r"unknown key\(s\) in \[moe\]: n_experts.*valid: variant"):
        RunConfig.from_dict({"moe": {"n_experts": 8}})
    with pytest.raises(MoegptError, match=r"unknown config section\(s\): modle"):
        RunConfig.from_dict({"modle": {}})


@pytest.mark.parametrize("section,key,value", [
    ("model", "n_layer", "4"), ("model", "n_layer", 4.5), ("model", "n_layer", True), ("model", "bias", 1),
    ("moe", "variant", 3), ("train", "lr", "1e-3"), ("train", "compile", "yes"), ("data", "name", None),
])
def test_wrong_types_raise_naming_the_key(section, key, value):
    with pytest.raises(MoegptError, match=rf"{section}\.{key} must be of type"):
        RunConfig.from_dict({section: {key: value}})


def test_non_table_sections_raise():
    with pytest.raises(MoegptError, match=r"\[moe\] must be a table"):
        RunConfig.from_dict({"moe": 3})
    with pytest.raises(MoegptError):
        RunConfig.from_dict([1, 2])


def test_int_widens_to_float():
    cfg = RunConfig.from_dict({"train": {"lr": 1}, "moe": {"capacity_factor": 2}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.moe.capacity_factor, float)


def test_partial_dict_keeps_defaults():
    cfg = RunConfig.from_dict({"moe": {"n_expert": 6}})
    assert cfg.moe.n_expert == 6 and cfg.moe.top_k == MoEConfig().top_k and cfg.model == ModelConfig()


# ---- round trips ---------------------------------------------------------------------------------

def test_dict_round_trip():
    cfg = custom_config()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.to_dict()) == {"model", "moe", "data", "train"}


def test_toml_round_trip(tmp_path):
    cfg = custom_config()
    assert RunConfig.from_dict(tomllib.loads(cfg.to_toml())) == cfg
    path = tmp_path / "config.toml"
    cfg.save(path)
    assert RunConfig.load(path) == cfg


def test_load_errors_are_one_line_moegpt_errors(tmp_path):
    with pytest.raises(MoegptError, match="config file not found"):
        RunConfig.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[moe\nn_expert = 3\n")
    with pytest.raises(MoegptError, match="malformed TOML"):
        RunConfig.load(bad)


# ---- validation ----------------------------------------------------------------------------------

def test_n_embd_must_divide_by_n_head():
    with pytest.raises(MoegptError, match=r"n_embd \(30\) must be divisible by model.n_head \(4\)"):
        validate_run_config(RunConfig(model=ModelConfig(n_embd=30, n_head=4)))


@pytest.mark.parametrize("top_k", [0, 9, -1])
def test_top_k_must_be_within_n_expert(top_k):
    assert "moe.top_k must be in [1, n_expert=8]" in problems_of(variant="topk", n_expert=8, top_k=top_k)


def test_top_k_bounds_apply_to_every_variant_that_uses_it():
    for variant in ("topk", "noisy-topk", "shared", "expert-choice", "aux-free"):
        assert "moe.top_k" in problems_of(variant=variant, n_expert=4, top_k=5), variant
    assert problems_of(variant="switch", n_expert=4, top_k=5) == ""  # switch is top-1 by definition
    assert "moe.top_k" in problems_of(variant="soft", n_expert=4, top_k=0)  # soft sizes experts by it


def test_every_variant_builds_with_its_defaults():
    from moegpt.model import GPT

    for variant in VARIANTS:
        cfg = validate_run_config(RunConfig(model=ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=8,
                                                              vocab_size=32), moe=MoEConfig(variant=variant)))
        GPT(cfg.model, cfg.moe)


def test_unknown_variant_lists_valid_names():
    message = problems_of(variant="bogus")
    assert "unknown MoE variant 'bogus'" in message
    for name in VARIANTS:
        assert name in message


@pytest.mark.parametrize("moe_kw,fragment", [
    ({"variant": "expert-choice", "capacity_factor": 0.0},
     "moe.capacity_factor must be > 0 for expert-choice"),
    ({"capacity_factor": float("nan")}, "moe.capacity_factor must be finite"),
    ({"activation": "tanh"}, "unknown activation 'tanh'; valid: " + ", ".join(ACTIVATIONS)),
    ({"dispatch": "magic"}, "unknown dispatch backend 'magic'; valid: " + ", ".join(BACKENDS)),
    ({"n_expert": 0}, "moe.n_expert must be >= 1"),
    ({"expert_hidden": -4}, "moe.expert_hidden must be >= 0"),
    ({"variant": "shared", "n_shared": -1}, "moe.n_shared must be >= 0"),
    ({"moe_every": 0}, "moe.moe_every must be >= 1"),
    ({"first_dense": -1}, "moe.first_dense must be >= 0"),
    ({"balance_coef": -0.1}, "moe.balance_coef must be a finite number >= 0"),
    ({"z_coef": float("inf")}, "moe.z_coef must be a finite number >= 0"),
    ({"variant": "aux-free", "n_expert": 8, "n_group": 3},
     "moe.n_group (3) must be >= 1 and divide n_expert (8)"),
    ({"variant": "aux-free", "n_expert": 8, "n_group": 4, "topk_group": 5},
     "moe.topk_group must be in [1, n_group=4]"),
    ({"variant": "aux-free", "n_expert": 8, "top_k": 4, "n_group": 4, "topk_group": 1}, "moe.top_k exceeds"),
    ({"variant": "soft", "slots_per_expert": 0}, "moe.slots_per_expert must be >= 1"),
])
def test_moe_validation_messages(moe_kw, fragment):
    assert fragment in problems_of(**moe_kw)


def test_negative_capacity_means_the_variants_default():
    for variant in VARIANTS:
        assert problems_of(variant=variant, capacity_factor=-1.0) == "", variant


@pytest.mark.parametrize("train_kw,fragment", [
    ({"lr": 0.0}, "train.lr must be a finite number > 0"),
    ({"batch_size": 0}, "train.batch_size must be > 0"),
    ({"min_lr_ratio": 1.5}, "train.min_lr_ratio must be in [0, 1]"),
    ({"device": "tpu"}, "train.device must be auto, cpu, cuda[:N] or mps"),
    ({"precision": "fp8"}, "train.precision must be auto, fp32 or bf16"),
])
def test_train_validation_messages(train_kw, fragment):
    assert fragment in "; ".join(RunConfig(train=TrainConfig(**train_kw)).problems())


def test_validate_reports_every_problem_in_one_error():
    cfg = RunConfig(model=ModelConfig(n_embd=30, n_head=4), moe=MoEConfig(top_k=0))
    with pytest.raises(MoegptError) as err:
        validate_run_config(cfg)
    assert "n_head" in str(err.value) and "top_k" in str(err.value) and "\n" not in str(err.value)


# ---- overrides and precedence --------------------------------------------------------------------

def test_apply_override_parses_by_field_type():
    cfg = RunConfig()
    for assignment in ("moe.n_expert=16", "train.lr=3e-4", "moe.normalize_topk=false", "train.name=abc",
                       " model.dropout = 0.2 "):
        apply_override(cfg, assignment)
    assert cfg.moe.n_expert == 16 and cfg.train.lr == 3e-4 and cfg.moe.normalize_topk is False
    assert cfg.train.name == "abc" and cfg.model.dropout == 0.2


@pytest.mark.parametrize("assignment,fragment", [
    ("moe.n_expert", "--set expects section.key=value"),
    ("n_expert=4", "--set expects section.key=value"),
    ("mo.n_expert=4", "unknown config section 'mo'"),
    ("moe.n_experts=4", "unknown key 'moe.n_experts'"),
    ("moe.n_expert=four", "moe.n_expert must be of type int"),
    ("moe.normalize_topk=maybe", "moe.normalize_topk must be of type bool"),
])
def test_apply_override_errors(assignment, fragment):
    with pytest.raises(MoegptError) as err:
        apply_override(RunConfig(), assignment)
    assert fragment in str(err.value)


def test_resolve_precedence_preset_file_flags_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[moe]\nn_expert = 6\ntop_k = 3\nactivation = "gelu"\n[train]\nlr = 0.005\n')
    base = preset_config("tiny")
    # preset alone
    assert resolve_config("tiny").moe.n_expert == base.moe.n_expert
    # the file overrides the preset, and leaves what it does not name at the preset's values
    cfg = resolve_config("tiny", str(path))
    assert (cfg.moe.n_expert, cfg.moe.top_k, cfg.train.lr) == (6, 3, 0.005)
    assert cfg.model.n_embd == base.model.n_embd and cfg.train.max_iters == base.train.max_iters
    # flags override the file; a flag left None never does
    flags = {"moe.n_expert": 8, "moe.top_k": None, "moe.activation": None, "model.n_layer": 3}
    cfg = resolve_config("tiny", str(path), flags)
    assert (cfg.moe.n_expert, cfg.moe.top_k, cfg.moe.activation, cfg.model.n_layer) == (8, 3, "gelu", 3)
    # --set overrides flags
    cfg = resolve_config("tiny", str(path), flags, ["moe.n_expert=4", "moe.top_k=1"])
    assert (cfg.moe.n_expert, cfg.moe.top_k) == (4, 1)


def test_resolve_validates_the_result_and_reports_bad_inputs(tmp_path):
    with pytest.raises(MoegptError, match="unknown preset 'huge'; valid: cpu"):
        resolve_config("huge")
    with pytest.raises(MoegptError, match="config file not found"):
        resolve_config("tiny", str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[moe]\nexperts = 4\n")
    with pytest.raises(MoegptError, match=r"unknown key\(s\) in \[moe\]: experts"):
        resolve_config("tiny", str(bad))
    with pytest.raises(MoegptError, match="moe.top_k must be in"):
        resolve_config("tiny", None, {"moe.top_k": 9})
    with pytest.raises(MoegptError, match="unknown MoE variant"):
        resolve_config("tiny", None, None, ["moe.variant=bogus"])


def test_resolve_does_not_mutate_presets():
    before = dataclasses.asdict(preset_config("tiny").moe)
    resolve_config("tiny", None, {"moe.n_expert": 2, "moe.top_k": 1}, ["moe.top_k=2"])
    assert dataclasses.asdict(preset_config("tiny").moe) == before
