"""Shared fixtures: a tiny prepared corpus (char tokenizer) built once per test session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("def return self import class for in if else while yield lambda value index count total "
         "print list dict tuple range len min max sum key item name data token expert router").split()


def write_text_corpus(folder: Path, n_files: int = 24, lines_per_file: int = 60, seed: int = 0) -> Path:
    """Deterministic python-flavoured text: enough structure for a tiny model to learn something."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(lines_per_file):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + ":")
        (folder / f"doc_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data root holding `tiny/` (char tokenizer), prepared by the library like `moegpt prepare` does."""
    from moegpt.data import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    corpus = write_text_corpus(tmp_path_factory.mktemp("corpus"))
    prepare_dataset(source=str(corpus), name="tiny", data_root=str(root), tokenizer="char", val_fraction=0.1, seed=0)
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: a second intra-op thread only adds waits (seconds on a busy shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _register_test_only_variant() -> None:
    """One registry line: every registry-parametrised test (contract, causality, report, CLI) now covers it."""
    import toy_variant

    from moegpt.moe import register

    register(toy_variant.SPEC)


_register_test_only_variant()
