"""`deltatune interpolate` (WiSE-FT) end to end on tiny runs: a LoRA language-model run (delta
scaled) and a fully fine-tuned classifier (weights interpolated). At α = 1 the sweep reproduces
the run's own final metrics, retention and probe included; at α = 0 the language model's
baseline (the original model exactly); the output folder holds every file; the model saved at
one α loads as a plain folder and reproduces that α's metrics; user mistakes are one line and
exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.jobs import EvalRequest, evaluate_saved, run_training
from deltatune.jobs.interpolate import InterpolateRequest, interpolate_run
from deltatune.spec import parse_run_spec
from tests.jobs.test_export import CORPUS, base_folder  # noqa: F401 (fixture: tiny Llama + BPE)
from tests.jobs.test_tasks import _labelled_files, bert_folder  # noqa: F401 (fixture)
from tests.test_fuzz import one_thread  # noqa: F401 (autouse fixture: one torch thread)

MAX_LENGTH = 32


@pytest.fixture(autouse=True)
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache" / "models"))


def _text_files(folder: Path) -> tuple[Path, Path, Path]:
    sentences = [s.strip() for s in CORPUS.split(". ") if s.strip()]
    train, evaluation, general = folder / "train.txt", folder / "eval.txt", folder / "general.txt"
    train.write_text("\n".join(sentences) + "\n")
    evaluation.write_text("\n".join(sentences[:5]) + "\n")
    general.write_text("\n".join(" ".join(reversed(s.split())) for s in sentences[:6]) + "\n")
    return train, evaluation, general


@pytest.fixture(scope="module")
def lora_run(base_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora-run")
    train, evaluation, general = _text_files(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTATUNE_CACHE", str(folder / "cache" / "models"))
        run_training(parse_run_spec({
            "model": str(base_folder), "task": "text", "method": "lora", "progress": False,
            "output_dir": str(folder / "run"),
            "method_options": {"r": 4, "alpha": 8, "targets": "all-linear"},
            "data": {"train": str(train), "eval": str(evaluation), "max_length": MAX_LENGTH},
            "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-2},
            "eval": {"retain": [{"path": str(general), "name": "general"}],
                     "probe_prompts": 4, "probe_new_tokens": 8}}))
    return folder / "run"


@pytest.fixture
def full_classifier_run(bert_folder: Path, tmp_path: Path) -> Path:
    train, evaluation = _labelled_files(tmp_path)
    run_training(parse_run_spec({
        "model": str(bert_folder), "task": "classification", "method": "full",
        "progress": False, "output_dir": str(tmp_path / "run"),
        "data": {"train": str(train), "eval": str(evaluation), "max_length": 16,
                 "train_limit": 30},
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 3e-3},
        "eval": {"baseline": False}}))
    return tmp_path / "run"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _request(run: Path, alphas, **options) -> InterpolateRequest:
    return InterpolateRequest(run=str(run), alphas=list(alphas), progress=False, **options)


def _row(summary: dict, alpha: float) -> dict:
    row = next(r for r in summary["table"] if r["alpha"] == alpha)
    return {k: v for k, v in row.items() if k != "alpha"}


def test_lora_sweep_reproduces_the_run_at_both_ends_and_writes_every_file(lora_run, tmp_path):
    out = tmp_path / "sweep"
    summary = interpolate_run(_request(lora_run, [0.0, 0.5, 1.0], out=str(out)))
    run = _summary(lora_run)
    assert summary["interpolation"] == "delta" and summary["metric"] == "perplexity"
    assert summary["alphas"] == [0.0, 0.5, 1.0] and not summary["greater_is_better"]
    final, baseline = run["final_metrics"], run["baseline_metrics"]
    assert {"retain_general_perplexity", "probe_kl"} <= set(final)
    at_one, at_zero = _row(summary, 1.0), _row(summary, 0.0)
    for name in at_one:  # task, the run's own retain set and the probe, as the run measured
        assert at_one[name] == pytest.approx(final[name], rel=1e-5, abs=2e-6), name
        assert at_zero[name] == pytest.approx(baseline[name], rel=1e-5, abs=2e-6), name
    assert at_zero["probe_kl"] == pytest.approx(0.0, abs=1e-6)
    assert at_one["probe_kl"] > 1e-3
    assert at_one["perplexity"] < at_zero["perplexity"]  # training helped: gain is negative
    changes = {c["alpha"]: c for c in summary["relative_to_alpha_0"]}
    drop = at_one["perplexity"] - at_zero["perplexity"]
    assert changes[1.0]["task_change"] == pytest.approx(drop, abs=2e-6)
    assert changes[1.0]["task_gain"] == pytest.approx(-drop, abs=2e-6)  # lower is better
    assert changes[0.0]["retention_change"]["retain_general_perplexity"] == 0.0
    assert summary["best_alpha"] in (0.5, 1.0)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["alpha"] for line in lines] == [0.0, 0.5, 1.0]
    assert lines[2]["perplexity"] == at_one["perplexity"]
    assert json.loads((out / "summary.json").read_text())["best_alpha"] == summary["best_alpha"]
    assert json.loads((out / "config.json").read_text())["alphas"] == [0.0, 0.5, 1.0]
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 4 and "retain_general_perplexity" in table
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_model_saved_at_one_alpha_loads_plain_and_reproduces_its_metric(lora_run, tmp_path):
    saved = tmp_path / "wise-0.5"
    summary = interpolate_run(_request(lora_run, [1.0], out=str(tmp_path / "sweep"),
                                       retain=[], probe=False, save_alpha=0.5,
                                       save_to=str(saved)))
    assert summary["alphas"] == [0.0, 1.0]  # 0 joins as the reference
    assert summary["saved"]["reload_max_abs_logit_diff"] < 1e-4
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(saved)
    assert not [k for k in plain.state_dict() if "lora" in k or "base_layer" in k]
    evaluation = Path(str(lora_run)).parent / "eval.txt"
    metrics = evaluate_saved(EvalRequest(model=str(saved), task="text", data=str(evaluation),
                                         max_length=MAX_LENGTH, progress=False))
    assert metrics["perplexity"] == pytest.approx(summary["saved"]["metrics"]["perplexity"],
                                                  rel=1e-5)
    ends = {_row(summary, 0.0)["perplexity"], _row(summary, 1.0)["perplexity"]}
    assert all(abs(metrics["perplexity"] - end) > 1e-3 for end in ends)  # really alpha 0.5
    info = json.loads((saved / "interpolation.json").read_text())
    assert info["wise_ft_alpha"] == 0.5 and info["method"] == "lora"
    with pytest.raises(ConfigError, match="not empty; choose another folder or pass --overwrite"):
        interpolate_run(_request(lora_run, [1.0], out=str(tmp_path / "sweep2"), probe=False,
                                 save_alpha=0.5, save_to=str(saved)))
    again = interpolate_run(_request(lora_run, [1.0], out=str(tmp_path / "sweep2"),
                                     probe=False, retain=[], save_alpha=1.0,
                                     save_to=str(saved), overwrite=True))
    assert json.loads((saved / "interpolation.json").read_text())["wise_ft_alpha"] == 1.0
    assert again["saved"]["metrics"]["perplexity"] == _row(again, 1.0)["perplexity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".wise-0.5")]


def test_full_fine_tuning_interpolates_weights_and_keeps_the_new_head(full_classifier_run,
                                                                      bert_folder, tmp_path,
                                                                      capsys):
    saved = tmp_path / "wise-0"
    summary = interpolate_run(_request(full_classifier_run, [1.0, 0.5, -0.25],
                                       save_alpha=0.0, save_to=str(saved)))
    assert "outside [0, 1] extrapolates" in capsys.readouterr().err
    assert summary["interpolation"] == "weights" and summary["metric"] == "accuracy"
    assert summary["alphas"] == [-0.25, 0.0, 0.5, 1.0] and summary["extrapolated"] == [-0.25]
    assert summary["new_head_kept"] and summary["retention_metrics"] == []  # no probe: classifier
    best = max(row["accuracy"] for row in summary["table"])
    assert summary["best_alpha"] == min(row["alpha"] for row in summary["table"]
                                        if row["accuracy"] == best and row["alpha"] >= 0)
    final = _summary(full_classifier_run)["final_metrics"]
    for name, value in _row(summary, 1.0).items():
        assert value == pytest.approx(final[name], rel=1e-5, abs=2e-6), name
    assert (full_classifier_run / "interpolate" / "tradeoff.png").is_file()
    # alpha 0: the original encoder exactly, under the trained head.
    weights = load_file(saved / "model.safetensors")
    original = load_file(bert_folder / "model.safetensors")
    tuned = load_file(full_classifier_run / "adapter" / "adapter_model.safetensors")
    body = [k for k in weights if not k.startswith("classifier.")]
    assert body and all(torch.equal(weights[k], original[k.removeprefix("bert.")]
                                    if k.removeprefix("bert.") in original else original[k])
                        for k in body)
    assert any(not torch.equal(tuned["base_model.model." + k], weights[k]) for k in body)
    assert torch.equal(weights["classifier.weight"],
                       tuned["base_model.model.classifier.weight"])
    assert json.loads((saved / "labels.json").read_text())["label_names"] == ["a", "b"]
    evaluation = full_classifier_run.parent / "eval.tsv"
    code = main(["eval", "--model", str(saved), "--task", "classification", "--data",
                 str(evaluation), "--max-length", "16", "--no-progress"])
    reported = json.loads(capsys.readouterr().out)
    assert code == 0
    assert reported["accuracy"] == pytest.approx(_row(summary, 0.0)["accuracy"])
    assert reported["loss"] == pytest.approx(_row(summary, 0.0)["loss"], rel=1e-5)


@pytest.mark.parametrize("arguments,message", [
    (["--alphas", "0,abc"], "--alphas '0,abc'"),
    (["--alphas", "0,nan"], "finite"),
    (["--alphas", "1:0:0.1"], "step must be positive"),
    (["--alpha", "0.5"], "--alpha and --save go together"),
])
def test_cli_mistakes_are_one_line_and_exit_2(arguments, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    code = main(["interpolate", str(run), "--no-progress", *arguments])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    code = main(["interpolate", str(tmp_path / "photos"), "--alphas", "0,1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a run directory" in err and "\n" not in err
    assert not (tmp_path / "photos" / "interpolate").exists()


def test_cli_sweep_with_retain_flag_and_no_probe(lora_run, tmp_path, capsys):
    general = lora_run.parent / "general.txt"
    out = tmp_path / "cli-sweep"
    code = main(["interpolate", str(lora_run), "--alphas", "0:1:0.5", "--retain-eval",
                 f"rev={general}", "--no-probe", "--eval-limit", "3", "--out", str(out),
                 "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["alphas"] == [0.0, 0.5, 1.0]
    assert summary["retention_metrics"] == ["retain_rev_loss", "retain_rev_perplexity"]
    # 3 of the 5 eval lines: fewer blocks than the run's 7.
    assert summary["eval_examples"] < 7 and "probe_kl" not in summary["table"][0]
    assert (out / "tradeoff.png").is_file() and (out / "table.md").is_file()


def test_a_method_without_a_weight_delta_is_refused_before_anything_is_written(base_folder,
                                                                             tmp_path):
    train, evaluation, _ = _text_files(tmp_path)
    run_training(parse_run_spec({
        "model": str(base_folder), "task": "text", "method": "prefix", "progress": False,
        "output_dir": str(tmp_path / "prefix"), "method_options": {"num_virtual_tokens": 2},
        "data": {"train": str(train), "eval": str(evaluation), "max_length": MAX_LENGTH},
        "train": {"max_steps": 1, "batch_size": 4}, "eval": {"baseline": False}}))
    with pytest.raises(ConfigError, match="cannot interpolate method 'prefix'.*lora"):
        interpolate_run(_request(tmp_path / "prefix", [0.5], probe=False))
    assert not (tmp_path / "prefix" / "interpolate").exists()


def test_parse_retain_flag():
    from deltatune.cli_forgetting import parse_retain_flag
    named = parse_retain_flag("c4=../shared/data/text/c4_demo.jsonl")
    assert (named.name, named.path) == ("c4", "../shared/data/text/c4_demo.jsonl")
    plain = parse_retain_flag("data/a=b.txt")  # a path holding '=' is a path
    assert plain.name is None and plain.path == "data/a=b.txt" and plain.display_name == "a=b"
    with pytest.raises(ConfigError, match="give a file after '='"):
        parse_retain_flag("c4=")


def test_freeze_run_with_an_untied_head_interpolates_its_weights(base_folder, tmp_path):
    train, evaluation, _ = _text_files(tmp_path)
    run_training(parse_run_spec({
        "model": str(base_folder), "task": "text", "method": "freeze", "progress": False,
        "output_dir": str(tmp_path / "freeze"), "eval": {"probe": "off"},
        "method_options": {"mode": "probe", "head_patterns": ["lm_head"]},
        "data": {"train": str(train), "eval": str(evaluation), "max_length": MAX_LENGTH},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-2}}))
    summary = interpolate_run(_request(tmp_path / "freeze", [0.0, 1.0], probe=False))
    run = _summary(tmp_path / "freeze")
    assert summary["interpolation"] == "weights"
    assert _row(summary, 0.0)["perplexity"] == pytest.approx(
        run["baseline_metrics"]["perplexity"], rel=1e-5)
    assert _row(summary, 1.0)["perplexity"] == pytest.approx(
        run["final_metrics"]["perplexity"], rel=1e-5)
    assert _row(summary, 1.0)["perplexity"] != _row(summary, 0.0)["perplexity"]
