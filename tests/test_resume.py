"""Resume after a crash, through the real command: `deltatune train` on a tiny local Llama is
killed with SIGKILL at a random step (and, separately, interrupted with Ctrl-C), then continued
with `deltatune train --resume RUN`; the final adapter is bit-identical to an uninterrupted run
with the same seed, and every file in the run directory stays readable after the kill."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_llama
from tests.models.test_loading import WORDS, llama_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    folder = root / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    llama_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    lines = [json.dumps({"instruction": " ".join(rng.choices(WORDS[:100], k=rng.randint(3, 9))),
                         "output": " ".join(rng.choices(WORDS[:100], k=rng.randint(2, 6)))})
             for _ in range(48)]
    data = root / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return folder, data


def _train_command(model: Path, data: Path, run: Path, save_every: int | None) -> list[str]:
    command = [sys.executable, "-m", "deltatune", "train", "--model", str(model),
               "--train", str(data), "--template", "alpaca", "--max-steps", str(STEPS),
               "--batch-size", "4", "--lr", "1e-2", "--log-every", "1", "--no-baseline",
               "--eval-limit", "4", "--max-new-tokens", "2", "-o", "r=4", "-o", "dropout=0.1",
               "--seed", "3", "--threads", "1", "--output-dir", str(run), "--no-progress"]
    return command + (["--save-every", str(save_every)] if save_every else [])


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _wait_for_step(run: Path, process: subprocess.Popen, step: int) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be stopped"
        if metrics.is_file():
            steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in time")


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _resume(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune", "train", "--resume", str(run),
                           "--no-progress"], cwd=ROOT, env=_environment(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tiny_setup, tmp_path_factory) -> dict:
    model, data = tiny_setup
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    completed = subprocess.run(_train_command(model, data, run, save_every=None), cwd=ROOT,
                               env=_environment(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return _adapter(run)


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].equal(b[key]), key


def test_kill_9_at_a_random_step_then_resume_is_bit_identical(tiny_setup, uninterrupted,
                                                              tmp_path):
    model, data = tiny_setup
    run = tmp_path / "run"
    process = subprocess.Popen(_train_command(model, data, run, save_every=3), cwd=ROOT,
                               env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for_step(run, process, random.Random().randint(4, STEPS // 2))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    # What a reader sees after the kill: whole JSON lines, a whole config, no summary yet.
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert (run / "config.yaml").is_file() and not (run / "summary.json").exists()
    assert not list(run.rglob("*.tmp"))  # no half-written file under its final name either
    completed = _resume(run)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resuming" in completed.stderr
    _assert_same_adapter(_adapter(run), uninterrupted)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from_step"] % 3 == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, in order


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_setup, uninterrupted, tmp_path):
    model, data = tiny_setup
    run = tmp_path / "run"
    process = subprocess.Popen(_train_command(model, data, run, save_every=None), cwd=ROOT,
                               env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, process, 5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert f"deltatune train --resume {run}" in stderr
    assert list((run / "checkpoints").glob("step-*"))
    completed = _resume(run)
    assert completed.returncode == 0, completed.stderr[-3000:]
    _assert_same_adapter(_adapter(run), uninterrupted)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    from deltatune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: smollm2-135m\n")
    assert main(["train", "--resume", str(run)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_nproc_2_trains_through_torchrun_and_rank_0_writes_one_run(tiny_setup, tmp_path):
    """`deltatune train --nproc 2` launches torchrun; the two processes split every global
    batch and rank 0 alone writes the run directory."""
    model, data = tiny_setup
    run = tmp_path / "run"
    command = _train_command(model, data, run, save_every=None)
    command[command.index("--max-steps") + 1] = "4"
    command[command.index("--batch-size") + 1] = "2"
    completed = subprocess.run([*command, "--nproc", "2"], cwd=ROOT, env=_environment(),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4]  # one writer
    assert _adapter(run)
