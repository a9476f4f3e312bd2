"""Threads that follow the load: the arithmetic on /proc counters, the callback's decisions on
scripted readings, and one real reading with a busy process next to this one."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from deltatune.train.loop import TrainState
from deltatune.train.threads import (AdaptiveThreads, CpuTimes, cores_used_by_others,
                                     free_cores, read_cpu_times)


def test_arithmetic():
    before, after = CpuTimes(100.0, 10.0, 0.0), CpuTimes(103.0, 11.0, 2.0)
    assert cores_used_by_others(before, after) == pytest.approx(1.0)
    assert free_cores(2, 0.0) == 2 and free_cores(2, 0.4) == 2
    assert free_cores(2, 0.7) == 1 and free_cores(2, 1.2) == 1 and free_cores(4, 2.6) == 1


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_the_callback_follows_scripted_load(two_threads):
    # others busy: 0.9 cores during the start sample, then 0.0 (the competitor ended).
    readings = iter([CpuTimes(0.0, 0.0, 0.0), CpuTimes(0.9, 0.0, 1.0),
                     CpuTimes(0.9, 0.0, 2.0)])
    callback = AdaptiveThreads(every_seconds=0.0, sample=0.0, read=lambda: next(readings),
                               cores=2, announce=False)
    state = TrainState(total_steps=3)
    callback.on_train_start(state)
    assert torch.get_num_threads() == 1
    state.step = 1
    callback.on_step_end(state)
    assert torch.get_num_threads() == 2
    assert callback.changes == [(0, 1), (1, 2)]
    callback.on_train_end(state)
    assert torch.get_num_threads() == 2


def test_the_ceiling_is_the_thread_count_before_training(two_threads):
    torch.set_num_threads(1)
    readings = iter([CpuTimes(0.0, 0.0, 0.0), CpuTimes(0.0, 0.0, 1.0)])
    callback = AdaptiveThreads(sample=0.0, read=lambda: next(readings), cores=8,
                               announce=False)
    callback.on_train_start(TrainState(total_steps=1))
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(read_cpu_times() is None, reason="no /proc/stat on this system")
def test_a_busy_process_is_seen():
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nend = time.monotonic() + 20\n"
                             "while time.monotonic() < end: pass"])
    try:
        time.sleep(0.3)  # let it start
        before = read_cpu_times()
        time.sleep(1.0)
        others = cores_used_by_others(before, read_cpu_times())
    finally:
        busy.kill()
        busy.wait()
    assert others > 0.5
