"""Two processes on CPU (gloo, launched by torchrun) train the same LoRA steps as one process with
the same global batch: the same loss curve and the same final adapter (within 1e-5), for DDP and
for FSDP2. Examples of unequal length give the ranks unequal label counts, which the loop's
token-weighted loss must absorb. Each launch has a timeout; the worker ends with a barrier and
destroys its process group."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 240
TEARDOWN_ABORT = "terminate called without an active exception"


def _run(out: Path, strategy: str, layout: str, processes: int) -> tuple[list[float], dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*launcher, "-m", "tests.train.distributed_worker", str(out), strategy, layout]
    for _attempt in range(2):
        completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True,
                                   text=True, timeout=TIMEOUT_SECONDS)
        # Gloo's teardown race (a worker thread still joinable at interpreter exit aborts the
        # process, pytorch/pytorch#190489) aborted rank 1 once in a 2-core CI run of
        # 2026-12-04 after its group was destroyed (9 reruns passed); only that exact abort is
        # retried, once.
        if not (completed.returncode != 0 and TEARDOWN_ABORT in completed.stderr):
            break
    assert completed.returncode == 0, completed.stderr[-3000:]
    losses = json.loads((out / "losses.json").read_text())
    return losses, load_file(str(out / "adapter.safetensors"))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, tuple[list[float], dict]]:
    root = tmp_path_factory.mktemp("single")
    return {layout: _run(root / layout, "ddp", layout, 1) for layout in ("packed", "padded")}


@pytest.mark.parametrize("strategy,layout", [("ddp", "packed"), ("ddp", "padded"),
                                             ("fsdp", "packed")])
def test_two_processes_equal_one_with_the_same_global_batch(single_process, tmp_path, strategy,
                                                            layout):
    reference_losses, reference_adapter = single_process[layout]
    losses, adapter = _run(tmp_path / strategy, strategy, layout, processes=2)
    assert len(losses) == len(reference_losses) == 4
    assert losses == pytest.approx(reference_losses, abs=1e-5)
    assert adapter.keys() == reference_adapter.keys()
    for key, tensor in reference_adapter.items():
        torch.testing.assert_close(adapter[key], tensor, atol=1e-5, rtol=0, msg=key)
    assert reference_losses[-1] < reference_losses[0]  # it trained
