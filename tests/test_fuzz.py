"""The fuzz suite at CI size: a few hundred seeded bad inputs (data files, YAML configs, method
options, tampered run directories, odd flag values) through the real `deltatune` command, each
of which must exit 0 or print exactly one `error:` line and exit 2 — no traceback, no hang, no
run folder left behind (tests/fuzz/harness.py). A few cases run as real subprocesses to cover
exit codes, stdin and memory. `python benchmarks/fuzz.py --cases 10000` runs the big one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import run_fuzz, tally

CASES = int(os.environ.get("DELTATUNE_FUZZ_CASES", "200"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fuzzed_inputs_exit_cleanly(tmp_path):
    outcomes = run_fuzz(CASES, seed=0, root=tmp_path)
    counts = tally(outcomes)
    assert counts["problems"] == [], "\n".join(counts["problems"][:20])
    # The generators reach both sides of the property: runs that work and clear errors.
    assert counts["exit_0"] > 0 and counts["exit_2"] > CASES // 3
    assert len(counts["by_generator"]) == 6


def _deltatune(args: list[str], tmp_path: Path, memory_bytes: int | None = None,
               timeout: int = 240) -> subprocess.CompletedProcess:
    limit = "" if memory_bytes is None else (
        f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, "
        f"{memory_bytes})); ")
    code = f"{limit}import sys; from deltatune.cli import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_stray_huge_label_is_an_error_within_bounded_memory(tmp_path):
    from tests.fuzz.harness import World, good_rows, write_rows_tsv

    world = World(tmp_path / "world").build()
    rows = good_rows(__import__("random").Random(1), 30) + [["wordaa wordab", "1000000000"]]
    rows = [[text, "1" if label == "pos" else "0" if label == "neg" else label]
            for text, label in rows]
    data = tmp_path / "train.tsv"
    write_rows_tsv(data, rows)
    completed = _deltatune(["train", "--model", str(world.bert), "--task", "classification",
                            "--train", str(data), "--max-steps", "1", "--no-progress",
                            "--output-dir", str(tmp_path / "out")], tmp_path,
                           memory_bytes=6 * 2 ** 30)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert lines[-1].startswith("error:") and "1000000000" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_bad_flag_is_exit_2_in_a_real_process(tmp_path):
    completed = _deltatune(["eval", "--batch-size", "0"], tmp_path, timeout=120)
    assert completed.returncode == 2
    assert "error:" in completed.stderr.strip().splitlines()[-1]
