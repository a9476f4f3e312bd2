"""A run's folder: nothing is written until the run starts, a failed run leaves nothing behind
(unless it wrote a checkpoint to resume from), an existing run is refused unless --overwrite,
and a loss that explodes is reported (or, with --stop-on-divergence, stops the run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError, TrainingError
from deltatune.jobs import run_training
from deltatune.spec import parse_run_spec
from deltatune.train.divergence import DivergenceGuard
from deltatune.train.loop import TrainState
from deltatune.train.run_dir import RunDirectory
from tests.jobs.test_tasks import _labelled_files, bert_folder  # noqa: F401 (fixture)


def _spec(bert_folder: Path, tmp_path: Path, output: Path, **train) -> dict:
    train_file, eval_file = _labelled_files(tmp_path)
    return {"model": str(bert_folder), "task": "classification", "progress": False,
            "output_dir": str(output),
            "data": {"train": str(train_file), "eval": str(eval_file), "max_length": 16,
                     "train_limit": 30},
            "train": {"max_steps": 2, "batch_size": 8, **train},
            "eval": {"baseline": False},
            "method_options": {"r": 2, "targets": ["query", "value"]}}


def test_failed_train_leaves_no_run_folder(tmp_path, capsys):
    output = tmp_path / "runs" / "bad"
    code = main(["train", "--model", "minilm-l6", "--task", "classification",
                 "--train", str(tmp_path / "absent.tsv"), "--output-dir", str(output),
                 "--no-progress"])
    assert code == 2 and "absent.tsv" in capsys.readouterr().err
    assert not output.exists()


def test_run_failing_in_training_removes_its_folder(bert_folder, tmp_path):
    output = tmp_path / "run"
    spec = parse_run_spec(_spec(bert_folder, tmp_path, output, learning_rate=1e6,
                                stop_on_divergence=True, max_steps=30))
    with pytest.raises(TrainingError, match="diverged|loss became"):
        run_training(spec)
    assert not output.exists()


def test_existing_run_is_refused_unless_overwrite(bert_folder, tmp_path):
    output = tmp_path / "run"
    spec = parse_run_spec(_spec(bert_folder, tmp_path, output))
    first = run_training(spec)
    lines = (output / "metrics.jsonl").read_text().splitlines()
    with pytest.raises(ConfigError, match="already holds a run; pass --overwrite"):
        run_training(spec)
    assert (output / "metrics.jsonl").read_text().splitlines() == lines
    second = run_training(spec, overwrite=True)
    # The second run replaced the first: its metrics alone, not appended to the first's.
    assert len((output / "metrics.jsonl").read_text().splitlines()) == len(lines)
    assert second.final_metrics == first.final_metrics


def test_folder_that_is_not_a_run_or_is_a_file_is_refused(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff")
    assert "not a deltatune run" in RunDirectory(foreign).problem(overwrite=True)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in RunDirectory(a_file).problem()
    assert "is a file" in RunDirectory(a_file / "under").problem()
    assert RunDirectory(tmp_path / "new").problem() is None
    (tmp_path / "empty").mkdir()
    assert RunDirectory(tmp_path / "empty").problem() is None


def test_cli_output_dir_that_is_a_file_is_one_line_error(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["train", "--output-dir", str(a_file / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output directory") and "\n" not in err
    assert a_file.read_text() == "x"


def test_discard_keeps_a_folder_with_a_checkpoint_or_made_by_someone_else(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.start({"a": 1})
    (run.path / "checkpoints" / "step-2").mkdir(parents=True)
    assert not run.discard() and run.path.is_dir()
    existing = tmp_path / "existing"
    existing.mkdir()
    other = RunDirectory(existing)
    other.start({"a": 1})
    assert not other.discard() and existing.is_dir()


def _state(step: int, loss: float) -> TrainState:
    return TrainState(total_steps=100, step=step, loss=loss, learning_rate=1e-3)


def test_divergence_is_reported_once_and_ignores_one_bad_batch(capsys):
    logged = []
    guard = DivergenceGuard(logged.append)
    for step, loss in enumerate([0.7, 0.6, 2.9, 0.5, 0.55], start=1):  # one hard batch
        guard.on_step_end(_state(step, loss))
    assert guard.diverged_at is None and not logged
    for step, loss in enumerate([40.0, 3e3, 3e7, 2e7], start=6):
        guard.on_step_end(_state(step, loss))
    assert guard.diverged_at == 6 and len(logged) == 1
    assert "lower the learning rate" in logged[0]["warning"]
    assert "warning: training diverged at step 6" in capsys.readouterr().err


def test_stop_on_divergence_raises_and_state_survives_a_checkpoint():
    guard = DivergenceGuard(stop=True)
    guard.on_step_end(_state(1, 0.7))
    restored = DivergenceGuard(stop=True)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    with pytest.raises(TrainingError, match="diverged at step 2"):
        restored.on_step_end(_state(2, 1e4))


def test_diverging_run_finishes_with_a_warning_in_metrics_and_summary(bert_folder, tmp_path):
    output = tmp_path / "run"
    summary = run_training(parse_run_spec(_spec(bert_folder, tmp_path, output,
                                                learning_rate=3.0, max_steps=12,
                                                grad_clip=None, log_every=1)))
    warnings = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
                if "warning" in line]
    assert summary.diverged_at_step is not None
    assert [w["step"] for w in warnings] == [summary.diverged_at_step]


def test_default_run_name_is_one_safe_folder_name():
    from deltatune.train.run_dir import default_run_name

    name = default_run_name("a/../b\\c:d", "lora")
    assert name.endswith("-a___b_c_d-lora") and "/" not in name and ".." not in name
