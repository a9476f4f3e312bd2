"""`deltatune analyze intrinsic-dimension`: d90 and its interpolation follow their definitions on
hand values, a sweep on a tiny classification model writes its runs and reports, a second call
retrains nothing, and mistakes are refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltatune.analyze.intrinsic import (IntrinsicRequest, _full_learning_rate, _interpolated,
                                         _result, measure_intrinsic_dimension)
from deltatune.errors import ConfigError
from tests.jobs.test_tasks import _labelled_files, bert_folder  # noqa: F401 (fixture)
from tests.test_fuzz import one_thread  # noqa: F401 (autouse fixture: one torch thread)


def test_d90_is_the_first_swept_dimension_reaching_ninety_percent():
    full = {"final_metrics": {"accuracy": 0.9}, "run": "full", "trainable_parameters": 100}
    rows = [{"dimension": d, "metrics": {"accuracy": a}, "train_wall_seconds": 1.0}
            for d, a in ((10, 0.5), (100, 0.7), (1000, 0.85), (10000, 0.8))]
    result = _result(IntrinsicRequest({}, [], "x"), full, "accuracy", rows)
    assert result["target"] == pytest.approx(0.81)
    assert result["d90"] == 1000
    # 0.81 lies 11/15 of the way from 0.70 (d=100) to 0.85 (d=1000) in log d.
    assert result["d90_interpolated"] == pytest.approx(10 ** (2 + 11 / 15), rel=1e-3)
    assert _interpolated([(10, 0.1), (100, 0.2)], 0.5) is None


@pytest.fixture
def base_config(bert_folder: Path, tmp_path: Path) -> dict:  # noqa: F811
    train, evaluation = _labelled_files(tmp_path)
    return {"model": str(bert_folder), "task": "classification",
            "data": {"train": str(train), "eval": str(evaluation), "max_length": 16},
            "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
            "eval": {"baseline": False}}


def test_the_full_reference_never_takes_an_adapter_learning_rate():
    lora = {"method": "lora", "train": {"learning_rate": 1e-3}}
    assert _full_learning_rate(IntrinsicRequest(lora, [1], "x")) == 5e-5
    full = {"method": "full", "train": {"learning_rate": 2e-5}}
    assert _full_learning_rate(IntrinsicRequest(full, [1], "x")) == 2e-5
    given = IntrinsicRequest(lora, [1], "x", full_learning_rate=3e-4)
    assert _full_learning_rate(given) == 3e-4


def test_sweep_writes_runs_and_reports_and_resumes(base_config, tmp_path):
    out = tmp_path / "intrinsic"
    request = IntrinsicRequest(base_config, [8, 2], str(out), learning_rate=0.5,
                               progress=False)
    result = measure_intrinsic_dimension(request)
    assert [row["dimension"] for row in result["dimensions"]] == [2, 8]
    for name in ("full", "d2", "d8"):
        assert (out / name / "summary.json").is_file()
    subspace = json.loads((out / "d8" / "summary.json").read_text())
    assert subspace["method"] == "subspace" and subspace["trainable_parameters"] == 8
    full_value = result["full_metric"]
    expected = next((row["dimension"] for row in result["dimensions"]
                     if row["metrics"]["accuracy"] >= 0.9 * full_value), None)
    assert result["d90"] == expected
    assert (out / "intrinsic.png").stat().st_size > 1000
    assert "d90" in (out / "intrinsic.md").read_text()
    stamps = {name: (out / name / "summary.json").stat().st_mtime_ns for name in ("full", "d2")}
    again = measure_intrinsic_dimension(IntrinsicRequest(base_config, [2], str(out),
                                                         learning_rate=0.5, progress=False))
    assert {name: (out / name / "summary.json").stat().st_mtime_ns for name in stamps} == stamps
    assert again["full_metric"] == full_value


def test_bad_dimensions_and_a_metric_without_direction_are_refused(base_config, tmp_path):
    with pytest.raises(ConfigError, match="positive integers"):
        measure_intrinsic_dimension(IntrinsicRequest(base_config, [0], str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="no summary.json"):
        measure_intrinsic_dimension(IntrinsicRequest(base_config, [2], str(tmp_path / "o"),
                                                     full_run=str(tmp_path / "missing")))


def test_cli_reports_a_missing_config_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deltatune", "analyze",
                             "intrinsic-dimension", "--config", str(tmp_path / "none.yaml"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_cli_runs_a_sweep(base_config, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(base_config))
    result = subprocess.run([sys.executable, "-m", "deltatune", "analyze",
                             "intrinsic-dimension", "--config", str(config), "--dimensions",
                             "4", "--lr", "0.5", "--out", str(tmp_path / "o"), "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["metric"] == "accuracy" and "d90" in printed
