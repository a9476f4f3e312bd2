"""`deltatune distill` end to end on tiny models: a student cut from the teacher (or named) trains
with no KD, word-level KD (teacher online or from the top-k cache, the teacher then out of
memory), sequence-level KD and interpolation (teacher beams cached: a rerun generates nothing);
the distilled model loads back and generates; mistakes are one ConfigError."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.data import DataConfig
from deltatune.errors import ConfigError
from deltatune.jobs.distill import DistillRequest, distill_saved
from deltatune.models import load_model
from deltatune.train.config import TrainConfig
from tests.jobs.test_export import base_folder  # noqa: F401 (fixture: tiny Llama + BPE)
from tests.jobs.test_prune import classifier_run  # noqa: F401 (fixture)
from tests.jobs.test_tasks import bert_folder  # noqa: F401 (fixture)
from tests.test_fuzz import one_thread  # noqa: F401 (autouse fixture: one torch thread)

DATES = DataConfig(builtin="dates", builtin_train_size=12, builtin_eval_size=3, max_length=96)


def _request(teacher: Path, out: Path, kind: str, **extra) -> DistillRequest:
    settings = {"student_layers": 1, "task": "causal-lm", "data": DATES,
                "train": TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-3),
                "beams": 2, "max_new_tokens": 4, "progress": False, **extra}
    return DistillRequest(teacher=str(teacher), out=str(out), kind=kind, **settings)


@pytest.mark.parametrize("kind,top_k", [("none", 0), ("word", 0), ("word", 8)])
def test_word_level_and_baseline_students(base_folder: Path, tmp_path: Path, kind, top_k):
    out = tmp_path / "kd"
    summary = distill_saved(_request(base_folder, out, kind, top_k=top_k))
    assert summary["student_stage"]["parameters"] < summary["teacher_stage"]["parameters"]
    assert ("kd" in summary["final_train_loss_terms"]) == (kind == "word")
    assert (out / "teacher_cache").is_dir() == bool(top_k)
    reloaded = load_model(str(out / "model"))
    assert reloaded.model.config.num_hidden_layers == 1
    assert isinstance(summary["sample_generation"], str)
    assert (out / "curve.png").stat().st_size > 1000


@pytest.mark.parametrize("kind", ["seq", "seq-inter"])
def test_sequence_level_kd_rewrites_responses_and_caches_them(base_folder: Path,
                                                              tmp_path: Path, kind):
    out = tmp_path / kind
    summary = distill_saved(_request(base_folder, out, kind))
    info = summary["sequence_kd"]
    assert info["prompts"] == 12 and info["mode"] == kind
    records = [json.loads(line) for line in (out / "seq_kd_train.jsonl").read_text().splitlines()]
    assert len(records) == 12
    cache_files = sorted(p.name for p in (out / "teacher_generations").iterdir())
    cached = {p: (out / "teacher_generations" / p).stat().st_mtime_ns for p in cache_files}
    distill_saved(_request(base_folder, out, kind, overwrite=True))
    again = {p: (out / "teacher_generations" / p).stat().st_mtime_ns for p in cache_files}
    assert again == cached  # nothing regenerated: the cache files were not rewritten


def test_classifier_logit_kd_from_a_run(classifier_run: Path, tmp_path: Path):
    summary = distill_saved(DistillRequest(
        teacher=str(classifier_run), out=str(tmp_path / "c"), kind="word", student_layers=1,
        train=TrainConfig(max_steps=2, batch_size=8, learning_rate=1e-3), progress=False))
    assert summary["task"] == "classification" and "accuracy" in summary["student_stage"]["metrics"]
    loaded = load_model(str(tmp_path / "c" / "model"), task="classification")
    assert loaded.model.config.num_hidden_layers == 1


def test_mistakes(base_folder: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="say which student"):
        distill_saved(DistillRequest(teacher=str(base_folder), out=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="the teacher has only 2 layers"):
        distill_saved(_request(base_folder, tmp_path / "b", "none", student_layers=5))
    with pytest.raises(ConfigError, match="--top-k caches the teacher for word-level KD only"):
        distill_saved(_request(base_folder, tmp_path / "c", "seq", top_k=4))


def test_runs_sharing_a_cache_dir_generate_once(base_folder: Path, tmp_path: Path):
    caches = tmp_path / "caches"
    distill_saved(_request(base_folder, tmp_path / "seq", "seq", cache_dir=str(caches)))
    generations = caches / "teacher_generations"
    stamps = {p.name: p.stat().st_mtime_ns for p in generations.iterdir()}
    summary = distill_saved(_request(base_folder, tmp_path / "inter", "seq-inter",
                                     cache_dir=str(caches)))
    assert {p.name: p.stat().st_mtime_ns for p in generations.iterdir()} == stamps
    assert not (tmp_path / "inter" / "teacher_generations").exists()
    assert summary["sequence_kd"]["prompts"] == 12
