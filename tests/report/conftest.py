"""Fixtures for the comparison tests: a tiny random BERT classifier saved as a model folder, a
two-class data set it can learn (the label is which half of the vocabulary a sentence uses), a
base run config, and one real comparison of two methods trained by `deltatune compare`'s runner
(shared by the test files: each variant is a real `deltatune train` process)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_bert
from tests.models.test_loading import WORDS, bert_tokenizer

STEPS = 4


@pytest.fixture(scope="session")
def tiny_classifier_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-setup")
    folder = root / "tiny-bert"
    tiny_bert(num_labels=2).bert.save_pretrained(folder)
    bert_tokenizer(root).save_pretrained(folder)
    rng = random.Random(0)
    rows = []
    for index in range(64):
        label = index % 2
        words = WORDS[:50] if label == 0 else WORDS[50:100]
        rows.append(f"{' '.join(rng.choices(words, k=rng.randint(3, 7)))}\t{'ab'[label]}")
    train, evaluation = root / "train.tsv", root / "eval.tsv"
    train.write_text("text\tlabel\n" + "\n".join(rows[:48]) + "\n")
    evaluation.write_text("text\tlabel\n" + "\n".join(rows[48:]) + "\n")
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": str(folder), "task": "classification", "method": "lora",
        "method_options": {"r": 2, "alpha": 4, "targets": ["query", "value"]},
        "data": {"train": str(train), "eval": str(evaluation), "max_length": 16},
        "train": {"max_steps": STEPS, "batch_size": 8, "log_every": 1, "learning_rate": 5e-3,
                  "threads": 1},
        "seed": 3}))
    return {"root": root, "model": folder, "train": train, "eval": evaluation, "base": base}


@pytest.fixture(scope="session")
def two_method_comparison(tiny_classifier_setup, tmp_path_factory):
    """`deltatune compare --methods lora,full` on the tiny classifier, run once."""
    from deltatune.jobs.compare import CompareRequest, run_comparison, variants_from_methods

    out = tmp_path_factory.mktemp("comparison") / "cmp"
    request = CompareRequest(config=str(tiny_classifier_setup["base"]),
                             variants=variants_from_methods("lora,full"), out=str(out),
                             progress=False)
    return request, run_comparison(request)
