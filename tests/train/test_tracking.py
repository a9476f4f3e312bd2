"""Experiment tracking through the real command: `deltatune train --report-to tensorboard` on a
tiny local Llama writes event files whose scalars, read back with TensorBoard's own
EventAccumulator, are metrics.jsonl's numbers at the same steps; a resumed run (after a crash
past its checkpoint, and after Ctrl-C) holds every step once; a missing package is a one-line
error with the fix and exit code 2 before the model loads; `none` writes nothing; of two
processes only the main one writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.train.callbacks import ProgressBar
from deltatune.train.loop import TrainState
from deltatune.train.run_dir import RunDirectory
from deltatune.train.trackers import Tracking, make_trackers, requested_trackers, scalar_tags
from tests.test_resume import tiny_setup  # noqa: F401 (fixture: tiny Llama + 48 records)

pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _train_args(setup: tuple[Path, Path], run: Path, steps: int, *extra: str) -> list[str]:
    model, data = setup
    return ["train", "--model", str(model), "--train", str(data), "--template", "alpaca",
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-2", "--log-every", "1",
            "--eval-every", "3", "--eval-limit", "4", "--max-new-tokens", "2", "-o", "r=4",
            "--seed", "3", "--threads", "1", "--output-dir", str(run), "--no-progress", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected_scalars(run: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """metrics.jsonl's numeric fields by the documented tags: {tag: {step: (value, time)}}."""
    expected: dict[str, dict[int, tuple[float, float]]] = {}
    for line in _metrics(run):
        for name, value in line.items():
            if name in ("step", "time") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            tag = "eval/" + name[5:] if name.startswith("eval_") else "train/" + name
            assert line["step"] not in expected.setdefault(tag, {}), (tag, line["step"])
            expected[tag][line["step"]] = (value, line["time"])
    return expected


def _event_scalars(run: Path) -> dict[str, dict[int, tuple[float, float]]]:
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {event.step: (event.value, event.wall_time)
                  for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def _raw_scalar_points(run: Path) -> list[tuple[str, int]]:
    """Every (tag, step) in the event files as written, without TensorBoard's purging."""
    points = []
    for file in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(file)).Load():
            # Scalars are either the old simple_value or a tensor of the scalars plugin.
            points += [(value.tag, event.step) for value in event.summary.value
                       if value.HasField("simple_value")
                       or value.metadata.plugin_data.plugin_name == "scalars"]
    return points


def _assert_events_equal_metrics(run: Path) -> None:
    expected, written = _expected_scalars(run), _event_scalars(run)
    assert "train/loss" in written and "train/lr" in written and "eval/loss" in written
    assert sorted(written) == sorted(expected)
    for tag, points in expected.items():
        assert sorted(written[tag]) == sorted(points), tag
        for step, (value, time) in points.items():
            # TensorBoard's scalars are float32: exactly the float32 of metrics.jsonl's value.
            assert written[tag][step][0] == np.float32(value), (tag, step)
            assert written[tag][step][1] == pytest.approx(time, abs=1e-3), (tag, step)
    raw = _raw_scalar_points(run)
    assert len(raw) == len(set(raw)), "a step is in the event files twice"
    assert len(raw) == sum(len(points) for points in expected.values())


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_setup, run, 7, "--report-to", "tensorboard")) == 0
    _assert_events_equal_metrics(run)
    written = _event_scalars(run)
    assert sorted(written["train/loss"]) == list(range(1, 8))
    assert sorted(written["eval/loss"]) == [0, 3, 6, 7]  # baseline, periodic, final
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    config_text = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0]
    assert b"report_to: tensorboard" in config_text and b"learning_rate: 0.01" in config_text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    start = HParamsPluginData.FromString(
        accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.learning_rate"].number_value == 0.01
    assert start.session_start_info.hparams["method"].string_value == "lora"


def test_resume_after_a_crash_holds_every_step_once(tiny_setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = ProgressBar.on_step_end

    def crash_at_step_7(self, state):
        original(self, state)
        if state.step == 7:
            raise RuntimeError("simulated crash after step 7")

    monkeypatch.setattr(ProgressBar, "on_step_end", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_train_args(tiny_setup, run, 10, "--report-to", "tensorboard", "--save-every", "4"))
    # Closed on the crash: steps 5-7, past the checkpoint at 4, are in the event files.
    assert max(step for tag, step in _raw_scalar_points(run) if tag == "train/loss") == 7
    monkeypatch.setattr(ProgressBar, "on_step_end", original)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [line["step"] for line in _metrics(run) if "loss" in line] == list(range(1, 11))
    _assert_events_equal_metrics(run)
    assert sorted(_event_scalars(run)["train/loss"]) == list(range(1, 11))


def test_ctrl_c_flushes_and_the_resume_continues(tiny_setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = ProgressBar.on_step_end

    def ctrl_c_at_step_5(self, state):
        original(self, state)
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler finishes the step

    monkeypatch.setattr(ProgressBar, "on_step_end", ctrl_c_at_step_5)
    assert main(_train_args(tiny_setup, run, 8, "--report-to", "tensorboard")) == 130
    assert sorted(_event_scalars(run)["train/loss"]) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(ProgressBar, "on_step_end", original)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_events_equal_metrics(run)
    assert sorted(_event_scalars(run)["train/loss"]) == list(range(1, 9))


def test_missing_package_is_one_line_error_exit_2_before_the_model_loads(tiny_setup, tmp_path,
                                                                         monkeypatch, capsys):
    # As if tensorboard were not installed: importing it (or torch's writer) fails.
    for name in [n for n in sys.modules if n == "tensorboard" or n.startswith("tensorboard.")
                 or n.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    run = tmp_path / "run"
    assert main(_train_args(tiny_setup, run, 3, "--report-to", "tensorboard")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "pip install tensorboard" in err
    assert "loading model" not in err and not run.exists()


def test_report_to_none_writes_nothing(tiny_setup, tmp_path):
    for extra in ((), ("--report-to", "none")):
        run = tmp_path / f"run{len(extra)}"
        assert main(_train_args(tiny_setup, run, 2, *extra)) == 0
        assert not (run / "tensorboard").exists()
        assert sorted(p.name for p in run.iterdir() if "tfevents" in p.name) == []
        assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_unknown_tracker_and_bad_lists_are_config_errors(tiny_setup, tmp_path, capsys):
    assert main(_train_args(tiny_setup, tmp_path / "run", 2, "--report-to", "wandb")) == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'wandb'" in err and "tensorboard" in err
    assert requested_trackers("none") == [] and requested_trackers(None) == []
    assert requested_trackers(" TensorBoard, ") == ["tensorboard"]
    assert requested_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        requested_trackers("tensorboard,none")


def test_yaml_config_key_reaches_the_trackers(tiny_setup, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  report_to: [tensorboard]\n")
    run = tmp_path / "run"
    assert main(_train_args(tiny_setup, run, 2, "--config", str(config))) == 0
    _assert_events_equal_metrics(run)


def test_scalar_tags_take_numbers_only():
    line = {"time": 1.5, "step": 4, "epoch": 0, "loss": 2.5, "loss_kl": 0.25, "lr": 1e-3,
            "eval_accuracy": 0.75, "eval_samples": [{"prediction": "a"}], "warning": "x",
            "stopped": True}
    assert scalar_tags(line) == {"train/epoch": 0.0, "train/loss": 2.5, "train/loss_kl": 0.25,
                                 "train/lr": 1e-3, "eval/accuracy": 0.75}


def test_a_process_that_does_not_write_starts_no_tracker(tmp_path):
    run = RunDirectory(tmp_path / "run", writes=False)
    tracking = Tracking(make_trackers("tensorboard"), run, {"seed": 0})
    tracking.on_train_start(TrainState(total_steps=1, is_main_process=False))
    run.log({"step": 1, "loss": 1.0})
    tracking.close()
    assert not (tmp_path / "run").exists() and tracking.started == []


def test_two_processes_write_one_event_file(tiny_setup, tmp_path):
    """`--nproc 2`: both ranks train, only rank 0 writes the event file."""
    run = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "deltatune", *_train_args(tiny_setup, run, 4),
               "--report-to", "tensorboard", "--nproc", "2", "--no-baseline"]
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(list((run / "tensorboard").iterdir())) == 1
    _assert_events_equal_metrics(run)
    assert sorted(_event_scalars(run)["train/loss"]) == [1, 2, 3, 4]
