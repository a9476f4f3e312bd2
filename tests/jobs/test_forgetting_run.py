"""Forgetting inside real training runs on tiny local models: retain sets and the probe measured
before training and at the end, side by side with the task gain in summary.json; the KL, replay,
EWC and L2-SP mitigations switched on from the spec, logged as named loss terms; sequential
fine-tuning (init_from, a grown head, the accuracy matrix) and multi-task training."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.jobs import run_training
from deltatune.jobs.sequential import SequentialRequest, run_sequential
from deltatune.spec import parse_run_spec
from tests.jobs.test_tasks import bert_folder  # noqa: F401 (fixture)
from tests.models.test_loading import WORDS
from tests.test_resume import tiny_setup  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama_setup(tiny_setup, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The resume tests' tiny Llama and instruction file, plus a general-text file."""
    folder, train = tiny_setup
    rng = random.Random(0)
    text = tmp_path_factory.mktemp("general") / "general.txt"
    text.write_text("\n".join(" ".join(rng.choices(WORDS[100:200], k=30)) for _ in range(30)))
    return folder, train, text


def _llama_spec(setup, output: Path, **forgetting) -> dict:
    folder, train, text = setup
    return {"model": str(folder), "task": "causal-lm", "progress": False,
            "output_dir": str(output), "seed": 1,
            "data": {"train": str(train), "template": "alpaca", "max_length": 32,
                     "eval_limit": 4},
            "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "threads": 1},
            "method_options": {"r": 4, "targets": ["q_proj", "v_proj"]},
            "eval": {"metric": "perplexity", "probe_prompts": 3, "probe_new_tokens": 6,
                     "retain": [{"path": str(text), "name": "general", "limit": 4}]},
            "forgetting": forgetting}


def test_retention_is_measured_before_and_after_next_to_the_task_gain(llama_setup, tmp_path):
    summary = run_training(parse_run_spec(_llama_spec(llama_setup, tmp_path / "run")))
    section = summary.forgetting
    retention = section["retention"]
    assert set(retention) >= {"retain_general_perplexity", "retain_general_loss", "probe_kl"}
    assert retention["probe_kl"]["before"] == pytest.approx(0.0, abs=1e-6)
    assert retention["probe_kl"]["after"] > 0
    change = retention["retain_general_loss"]
    assert change["change"] == pytest.approx(change["after"] - change["before"], abs=1e-5)
    task = section["task"]
    assert task["metric"] == "perplexity"
    assert task["gain"] == pytest.approx(task["before"] - task["after"], abs=1e-5)
    assert section["probe_seconds"] > 0 and section["mitigations"] == []
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
             .splitlines()]
    assert "eval_retain_general_perplexity" in lines[0] and lines[0]["step"] == 0
    assert "eval_combined" in lines[-1]
    assert (tmp_path / "run/probe_reference.safetensors").is_file()


def test_mitigations_are_named_loss_terms(llama_setup, tmp_path):
    _, _, text = llama_setup
    spec = _llama_spec(llama_setup, tmp_path / "run", kl_weight=0.5, l2sp_weight=0.1,
                       ewc_weight=10.0, ewc_batches=2, replay={"path": str(text)},
                       replay_fraction=0.25)
    summary = run_training(parse_run_spec(spec))
    assert set(summary.final_train_loss_terms) == {"ce", "kl", "l2sp", "ewc"}
    assert all(value > 0 for name, value in summary.final_train_loss_terms.items())
    assert summary.forgetting["mitigations"] == ["kl", "replay", "ewc", "l2sp"]
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
              .splitlines()]
    assert any("loss_kl" in line and "loss_l2sp" in line for line in logged)


def test_kl_weight_on_a_classifier_is_refused(bert_folder, tmp_path):  # noqa: F811
    from tests.jobs.test_tasks import _labelled_files
    train, evaluation = _labelled_files(tmp_path)
    spec = parse_run_spec({"model": str(bert_folder), "task": "classification",
                           "method": "full", "progress": False, "output_dir": str(tmp_path / "run"),
                           "data": {"train": str(train), "eval": str(evaluation)},
                           "train": {"max_steps": 1}, "forgetting": {"kl_weight": 1.0}})
    with pytest.raises(ConfigError, match="replay, --ewc-weight or --l2sp-weight"):
        run_training(spec)
    assert not (tmp_path / "run").exists()


def _class_files(tmp_path: Path, name: str, labels: str, offset: int) -> tuple[Path, Path]:
    rows = [f"{WORDS[offset + i]} {WORDS[offset + i + 1]}\t{labels[i % len(labels)]}"
            for i in range(40)]
    train, evaluation = tmp_path / f"{name}-train.tsv", tmp_path / f"{name}-eval.tsv"
    train.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    evaluation.write_text("text\tlabel\n" + "\n".join(rows[:12]) + "\n")
    return train, evaluation


def _stage_yaml(bert_folder: Path, tmp_path: Path, name: str, labels: str, offset: int) -> Path:
    import yaml
    train, evaluation = _class_files(tmp_path, name, labels, offset)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(bert_folder), "task": "classification", "method": "full",
        "data": {"train": str(train), "eval": str(evaluation), "max_length": 16},
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "threads": 1},
        "eval": {"baseline": False}}))
    return path


@pytest.mark.parametrize("mitigation", [{}, {"ewc_weight": 5.0, "ewc_batches": 2},
                                        {"replay_fraction": 0.25}, {"l2sp_weight": 0.1}])
def test_sequential_runs_grow_the_head_and_report_the_matrix(bert_folder, tmp_path,  # noqa: F811
                                                             mitigation):
    first = _stage_yaml(bert_folder, tmp_path, "alpha", "ab", 0)
    second = _stage_yaml(bert_folder, tmp_path, "beta", "cde", 50)
    out = tmp_path / "sequence"
    summary = run_sequential(SequentialRequest([str(first), str(second)], str(out), mitigation,
                                               progress=False))
    labels = json.loads((out / "02-beta/labels.json").read_text())["label_names"]
    assert labels == ["a", "b", "c", "d", "e"]
    rows = summary["rows"]
    assert set(rows[1]["metrics"]) == {"alpha", "beta"}
    stage_two = json.loads((out / "02-beta/summary.json").read_text())
    assert stage_two["final_metrics"]["retain_alpha_accuracy"] == rows[1]["metrics"]["alpha"]
    assert summary["forgetting_of_first_task"] == pytest.approx(
        rows[0]["metrics"]["alpha"] - rows[1]["metrics"]["alpha"], abs=1e-6)
    expected_terms = {"ewc_weight": "ewc", "l2sp_weight": "l2sp"}
    for key, term in expected_terms.items():
        assert (term in stage_two["final_train_loss_terms"]) == (key in mitigation)
    assert "Forgetting of alpha" in (out / "report.md").read_text()
    # The head rows of stage one's classes start from stage one's weights.
    from safetensors.torch import load_file
    one = load_file(out / "01-alpha/adapter/adapter_model.safetensors")
    assert one["base_model.model.classifier.weight"].shape[0] == 2


def test_a_finished_stage_is_reused(bert_folder, tmp_path):  # noqa: F811
    first = _stage_yaml(bert_folder, tmp_path, "alpha", "ab", 0)
    second = _stage_yaml(bert_folder, tmp_path, "beta", "cd", 50)
    out = tmp_path / "sequence"
    run_sequential(SequentialRequest([str(first), str(second)], str(out), progress=False))
    stamp = (out / "01-alpha/summary.json").stat().st_mtime_ns
    run_sequential(SequentialRequest([str(first), str(second)], str(out), progress=False))
    assert (out / "01-alpha/summary.json").stat().st_mtime_ns == stamp


def test_init_from_copies_the_earlier_weights(bert_folder, tmp_path):  # noqa: F811
    first = _stage_yaml(bert_folder, tmp_path, "alpha", "ab", 0)
    out = tmp_path / "sequence"
    run_sequential(SequentialRequest([str(first), str(first)], str(out), progress=False))
    from deltatune.jobs.preparation import prepare
    import yaml
    raw = yaml.safe_load(first.read_text())
    raw.update({"init_from": str(out / "01-alpha"), "output_dir": str(tmp_path / "x"),
                "progress": False})
    job = prepare(parse_run_spec(raw))
    from safetensors.torch import load_file
    trained = load_file(out / "01-alpha/adapter/adapter_model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(job.loaded.model.state_dict()[key],
                               trained["base_model.model." + key])


def test_multitask_reports_each_task_and_their_mean(bert_folder, tmp_path):  # noqa: F811
    alpha = _class_files(tmp_path, "alpha", "ab", 0)
    beta = _class_files(tmp_path, "beta", "cde", 50)
    spec = parse_run_spec({
        "model": str(bert_folder), "task": "classification", "method": "full",
        "progress": False, "output_dir": str(tmp_path / "run"),
        "multitask": {"temperature": 2.0, "tasks": [
            {"name": "alpha", "data": {"train": str(alpha[0]), "eval": str(alpha[1])}},
            {"name": "beta", "data": {"train": str(beta[0]), "eval": str(beta[1])}}]},
        "train": {"max_steps": 3, "batch_size": 8, "threads": 1}})
    summary = run_training(spec)
    final = summary.final_metrics
    assert final["accuracy"] == pytest.approx((final["alpha_accuracy"]
                                               + final["beta_accuracy"]) / 2, abs=1e-6)
    assert summary.data["label_names"] == ["a", "b", "c", "d", "e"]


def test_train_cli_takes_the_forgetting_flags(llama_setup, tmp_path, capsys):
    folder, train, text = llama_setup
    code = main(["train", "--model", str(folder), "--train", str(train), "--template", "alpaca",
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "32",
                 "--eval-limit", "2", "--metric", "perplexity", "-o", "r=2", "--threads", "1",
                 "--retain-eval", f"general={text}", "--replay", str(text),
                 "--kl-weight", "0.2", "--probe", "off", "--no-progress",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert "retain_general_perplexity" in summary["forgetting"]["retention"]
    assert "probe_kl" not in summary["final_metrics"]
    assert "forgetting:" in capsys.readouterr().err


def test_sequential_cli_needs_two_stages_and_eval_files(bert_folder, tmp_path,  # noqa: F811
                                                        capsys):
    first = _stage_yaml(bert_folder, tmp_path, "alpha", "ab", 0)
    assert main(["sequential", "--stage", str(first), "--out", str(tmp_path / "s")]) == 2
    assert "at least two stages" in capsys.readouterr().err
    import yaml
    raw = yaml.safe_load(first.read_text())
    del raw["data"]["eval"]
    first.write_text(yaml.safe_dump(raw))
    code = main(["sequential", "--stage", str(first), "--stage", str(first), "--out",
                 str(tmp_path / "s"), "--no-progress"])
    assert code == 2 and "needs its own eval file" in capsys.readouterr().err


def test_a_lora_run_started_from_another_run_reloads_on_its_weights(bert_folder,  # noqa: F811
                                                                    tmp_path):
    """eval/generate/export load an init_from run on the earlier run's weights, so its saved
    adapter reproduces its own final metrics."""
    import yaml
    from deltatune.jobs.inference import EvalRequest, evaluate_saved
    first = _stage_yaml(bert_folder, tmp_path, "alpha", "ab", 0)
    out = tmp_path / "sequence"
    second = yaml.safe_load(first.read_text())
    second.update({"method": "lora", "method_options": {"r": 2, "targets": ["query", "value"]}})
    second_path = tmp_path / "second.yaml"
    second_path.write_text(yaml.safe_dump(second))
    run_sequential(SequentialRequest([str(first), str(second_path)], str(out), progress=False))
    run = out / "02-second"
    final = json.loads((run / "summary.json").read_text())["final_metrics"]
    metrics = evaluate_saved(EvalRequest(run=str(run), progress=False))
    assert metrics["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)
