"""Torch threads that follow the machine's load, so training degrades gracefully when another
process competes for the cores.

torch's OpenMP threads meet at a barrier after every parallel operation. When another CPU-bound
process holds one of two cores, every barrier waits for a descheduled thread, and two threads
run far slower than one (measured on a 2-core machine, MiniLM LoRA training with one busy
competitor: 505-586 real tok/s with two threads, 1,416 with one; quiet: 2,100 with two, 1,450
with one). `AdaptiveThreads` samples how many cores other processes keep busy (from
/proc/stat, minus this process's own time) at the start and every few seconds, and sets torch's
threads to the cores left over (at least one, at most the count it started with). Linux only;
elsewhere it leaves the threads alone. OMP_WAIT_POLICY=passive is no alternative: it costs 40 %
on a quiet machine (1,228 tok/s with two threads).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from deltatune.train.loop import Callback, TrainState

# Another process counts as holding a core once it uses this much of one.
BUSY_THRESHOLD = 0.5


@dataclass
class CpuTimes:
    """Busy CPU time of the whole machine and of this process, in seconds, at `wall`."""
    machine_busy: float
    own: float
    wall: float


def read_cpu_times() -> CpuTimes | None:
    """Counters from /proc (None where they do not exist)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()[1:]
        with open("/proc/self/stat", encoding="ascii") as handle:
            own_fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    own = int(own_fields[11]) + int(own_fields[12])  # utime, stime (fields 14 and 15)
    return CpuTimes(busy / ticks, own / ticks, time.monotonic())


def cores_used_by_others(before: CpuTimes, after: CpuTimes) -> float:
    elapsed = max(after.wall - before.wall, 1e-6)
    others = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(others, 0.0) / elapsed


def free_cores(cores: int, others: float) -> int:
    return cores - int(others + (1 - BUSY_THRESHOLD))


class AdaptiveThreads(Callback):
    """Sets torch's threads to the cores other processes leave free: measured for `sample`
    seconds before training, then every `every_seconds` from the counters between checks.
    The thread count in force before training is the ceiling, and comes back at the end."""

    def __init__(self, every_seconds: float = 5.0, sample: float = 0.3,
                 read: Callable[[], CpuTimes | None] = read_cpu_times,
                 cores: int | None = None, announce: bool = True):
        self.every, self.sample, self.read = every_seconds, sample, read
        self.cores = cores or os.cpu_count() or 1
        self.announce = announce
        self.ceiling = torch.get_num_threads()
        self.last: CpuTimes | None = None
        self.changes: list[tuple[int, int]] = []  # (step, threads)

    def on_train_start(self, state: TrainState) -> None:
        self.ceiling = torch.get_num_threads()
        first = self.read()
        if first is None:
            return
        time.sleep(self.sample)
        self.last = first
        self._adjust(state)

    def on_step_end(self, state: TrainState) -> None:
        if self.last is not None and time.monotonic() - self.last.wall >= self.every:
            self._adjust(state)

    def on_train_end(self, state: TrainState) -> None:
        torch.set_num_threads(self.ceiling)

    def _adjust(self, state: TrainState) -> None:
        now = self.read()
        if now is None or self.last is None:
            return
        others = cores_used_by_others(self.last, now)
        self.last = now
        wanted = min(self.ceiling, max(1, free_cores(self.cores, others)))
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            self.changes.append((state.step, wanted))
            if self.announce and state.is_main_process:
                print(f"\nthreads: {wanted} (other processes keep {others:.1f} of "
                      f"{self.cores} cores busy)", file=sys.stderr, flush=True)
