"""Experiment trackers (`train.report_to`, `--report-to tensorboard`): every line the run
directory writes to metrics.jsonl also goes to each tracker, its numbers as scalars at the line's
step under `train/<field>` or `eval/<metric>` (see `scalar_tags`), so a tracker shows exactly
metrics.jsonl's values; the run config goes along as text and hyperparameters. Trackers are
listed once in `_TRACKERS` and imported lazily, so a tracker's package loads only when a run asks
for it, and a missing one is a one-line error with the install command before the model loads.
The job asks this module for `Tracking`, a loop callback; neither the job nor the loop names a
tracker. Only the run directory's writer (the main process) starts them. On resume the
checkpoint has cut metrics.jsonl back to its step, and every tracker starts by rebuilding its
record from those lines (TensorBoard rewrites RUN_DIR/tensorboard/ from them, with their original
wall times), so the steps run again are not there twice."""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import yaml

from deltatune.errors import ConfigError
from deltatune.train.loop import Callback, TrainState
from deltatune.train.run_dir import RunDirectory

NO_TRACKER = "none"
# metrics.jsonl fields that say where and when a line is, not what was measured.
_POSITION_FIELDS = ("step", "time")


class Tracker(Protocol):
    """One tracking backend. `start` receives the lines metrics.jsonl already holds and makes the
    tracker's record equal to them; `record` then gets every new line as it is written."""

    def start(self, run_path: Path, config: dict[str, Any],
              history: Sequence[dict[str, Any]]) -> None: ...

    def record(self, line: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrackerEntry:
    module: str
    tracker_class: str
    package: str  # what `pip install` needs
    summary: str


_TRACKERS: dict[str, TrackerEntry] = {
    "tensorboard": TrackerEntry("deltatune.train.trackers", "TensorBoardTracker", "tensorboard",
                                "TensorBoard event files in RUN_DIR/tensorboard/"),
}


def tracker_names() -> list[str]:
    return list(_TRACKERS)


def requested_trackers(report_to: str | Sequence[str] | None) -> list[str]:
    """`report_to` as tracker names: "tensorboard", "a,b" or a list; "none" (or nothing) is no
    tracker. Unknown names are a ConfigError listing the known ones."""
    parts = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    names = [str(part).strip().lower() for part in parts if str(part).strip()]
    if NO_TRACKER in names and len(names) > 1:
        raise ConfigError(f"report_to {','.join(names)}: 'none' cannot be combined with "
                          "trackers; give the trackers only, or none")
    names = list(dict.fromkeys(name for name in names if name != NO_TRACKER))
    unknown = [name for name in names if name not in _TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker '{unknown[0]}' in report_to; choose from: "
                          f"{', '.join(_TRACKERS)}, or none")
    return names


def make_trackers(report_to: str | Sequence[str] | None) -> list[Tracker]:
    """The requested trackers, their packages imported now: a missing package is a ConfigError
    with the install command, raised before anything is trained."""
    trackers = []
    for name in requested_trackers(report_to):
        entry = _TRACKERS[name]
        tracker_class = getattr(importlib.import_module(entry.module), entry.tracker_class)
        trackers.append(tracker_class())
    return trackers


def missing_package(name: str) -> ConfigError:
    entry = _TRACKERS[name]
    return ConfigError(f"--report-to {name} needs the {entry.package} package, which is not "
                       f"installed; install it with: pip install {entry.package} (or pip "
                       "install 'deltatune[tracking]'), or train without --report-to")


def scalar_tags(line: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line's numbers by tracker tag: `eval_<metric>` fields become
    `eval/<metric>`, every other numeric field `train/<field>` (train/loss, train/lr,
    train/tokens_per_second, ...). Booleans, text, lists and the line's step and time are not
    scalars."""
    tags = {}
    for name, value in line.items():
        if name in _POSITION_FIELDS or isinstance(value, bool) \
                or not isinstance(value, (int, float)):
            continue
        tag = f"eval/{name[len('eval_'):]}" if name.startswith("eval_") else f"train/{name}"
        tags[tag] = float(value)
    return tags


def flat_hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The run config as dotted keys with number, text or boolean values (None left out, lists
    as text), the form TensorBoard's hparams and MLflow's params take."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(item) for item in value)
        elif value is not None:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class Tracking(Callback):
    """Sends the run directory's metrics lines to the trackers, from the start of training (when
    a resumed run's metrics.jsonl has been cut back to its checkpoint) until `close`. The lines
    logged before training (the baseline at step 0) reach the trackers as history."""

    def __init__(self, trackers: Sequence[Tracker], run: RunDirectory, config: dict[str, Any]):
        self.trackers, self.run, self.config = list(trackers), run, config
        self.started: list[Tracker] = []

    def on_train_start(self, state: TrainState) -> None:
        if not (self.run.writes and state.is_main_process) or self.started:
            return
        history = self.run.logged()
        for tracker in self.trackers:
            tracker.start(self.run.path, self.config, history)
            self.started.append(tracker)
        self.run.listeners.append(self._record)

    def on_interrupt(self, state: TrainState) -> None:
        for tracker in self.started:
            tracker.flush()

    def _record(self, line: dict[str, Any]) -> None:
        for tracker in self.started:
            tracker.record(line)

    def close(self) -> None:
        """Flushes and closes every started tracker (at the end, on Ctrl-C and on a crash)."""
        if self._record in self.run.listeners:
            self.run.listeners.remove(self._record)
        started, self.started = self.started, []
        for tracker in started:
            tracker.close()


# -- TensorBoard -------------------------------------------------------------------------------

TENSORBOARD_FOLDER = "tensorboard"


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR`), written with torch's
    SummaryWriter: scalars (stored as float32, TensorBoard's scalar format), the config as text
    (tag `config`) and as hyperparameters (the HPARAMS tab), divergence warnings as text (tag
    `warnings`)."""

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard") from None
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def start(self, run_path: Path, config: dict[str, Any],
              history: Sequence[dict[str, Any]]) -> None:
        folder = Path(run_path) / TENSORBOARD_FOLDER
        # Rebuilt from metrics.jsonl: after a resume it holds each step once, like the file.
        if folder.exists():
            shutil.rmtree(folder)
        self.writer = self._writer_class(log_dir=str(folder), flush_secs=10)
        started = history[0].get("time") if history else None
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False)
                             + "```", global_step=0, walltime=started)
        self._write_hyperparameters(flat_hyperparameters(config), started)
        for line in history:
            self.record(line)
        self.writer.flush()

    def record(self, line: dict[str, Any]) -> None:
        step, walltime = int(line.get("step", 0)), line.get("time")
        for tag, value in scalar_tags(line).items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=walltime)
        if isinstance(line.get("warning"), str):
            self.writer.add_text("warnings", line["warning"], global_step=step,
                                 walltime=walltime)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _write_hyperparameters(self, values: dict[str, Any], walltime: float | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        # In the run's own event file (SummaryWriter.add_hparams would open a second run).
        writer = self.writer._get_file_writer()
        for summary in hparams(values, {}):
            writer.add_summary(summary, 0, walltime)
