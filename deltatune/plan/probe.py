"""The measured probe behind `deltatune plan`: real `deltatune train` runs of a shortened copy of
the model — the same configuration with a quarter and a half of its layers
(planner.probe_depths), randomly initialised, real hidden sizes, real tokenizer — on synthetic
data that fills every micro-batch (batch size x max length tokens), each in a fresh process.
Each run is the real command, so everything a real run holds at its peak is in its measured
`peak_memory_bytes`: the Python/torch/deltatune runtime, the tokenizer, the speed switches and
the allocator policy of the loop, AdamW, gradient clipping, the forgetting probe and the final
evaluation. What grows with depth grows (to within the allocator's noise) linearly in the number
of layers, so the two runs give the cost of one more layer and the full model's peak and step
time are extrapolated from them (deltatune/plan/estimate.py).

Why randomly initialised: the memory and the time of a step do not depend on the weights'
values, so the model's weights are never loaded."""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.errors import ConfigError

# Words of synthetic text: random letters, so that records are long enough to be cut at
# max_length (the plan's worst case: every example fills it) whatever the tokenizer.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# A tail of the train command's stderr kept when a probe run fails (its error line).
_ERROR_TAIL = 600


@dataclass
class ProbeSettings:
    """What a probe run trains: the settings of the real run it stands for."""
    task: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    max_length: int = 256
    eval_batch_size: int = 32
    steps: int = 3
    probe: str = "auto"
    num_labels: int = 2
    activation_checkpointing: bool = False
    allocator: str = "reuse"
    base_dtype: str = "fp32"
    threads: int | None = None
    seed: int = 0


@dataclass
class ProbeRun:
    """One measured `deltatune train` run of a `layers`-layer copy of the model."""
    layers: int
    peak_memory_bytes: int | None = None
    # Wall seconds of each optimizer step, from the run's metrics.jsonl.
    step_seconds: list[float] = field(default_factory=list)
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    # The summary's `quantization` (dense and packed bytes of the frozen linears), if any.
    quantization: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.peak_memory_bytes is not None

    def seconds_per_step(self) -> float | None:
        """Median step time without the first step (optimizer state, first page faults)."""
        steady = self.step_seconds[1:] or self.step_seconds
        if not steady:
            return None
        ordered = sorted(steady)
        return ordered[len(ordered) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_per_step": self.seconds_per_step()}


def shortened_config(config: Any, layers: int) -> Any:
    """A copy of a transformers config with `layers` hidden layers (everything else as is)."""
    if not hasattr(config, "num_hidden_layers"):
        raise ConfigError(f"{type(config).__name__} has no num_hidden_layers; deltatune plan "
                          "needs a transformer whose depth it can change")
    short = copy.deepcopy(config)
    short.num_hidden_layers = layers
    for name in ("layer_types",):  # per-layer lists (sliding/full attention) follow the depth
        value = getattr(short, name, None)
        if isinstance(value, list) and len(value) > layers:
            setattr(short, name, value[:layers])
    return short


def write_probe_model(config: Any, tokenizer: Any, model_class: Any, layers: int,
                      folder: Path) -> Path:
    """A `layers`-layer, randomly initialised copy of the model as a folder `deltatune train
    --model` loads (safetensors + config + tokenizer, the layout of deltatune's model cache)."""
    from deltatune.models.loading import write_model_folder

    torch.manual_seed(0)
    short = shortened_config(config, layers)
    short._attn_implementation = "sdpa"
    model = model_class.from_config(short, dtype=torch.float32)
    write_model_folder(model, tokenizer, folder, meta={"deltatune_plan_probe": layers})
    return folder


def _words(generator: random.Random, count: int) -> str:
    return " ".join("".join(generator.choice(_LETTERS) for _ in range(generator.randint(3, 8)))
                    for _ in range(count))


def write_probe_data(task: str, settings: ProbeSettings, folder: Path) -> tuple[Path, Path]:
    """Training and evaluation files for the task whose every example fills `max_length`
    tokens: text blocks are cut at max_length; classification sentences and instruction
    responses are longer than it and truncated (each word is at least one token). Enough for
    `steps` micro-batches and one full evaluation batch."""
    generator = random.Random(settings.seed)
    length = settings.max_length
    folder.mkdir(parents=True, exist_ok=True)

    def records(count: int) -> list[dict[str, Any]]:
        if task == "classification":
            return [{"text": _words(generator, length + 8), "label": str(i % settings.num_labels)}
                    for i in range(count)]
        if task == "text":
            # Concatenated and cut into blocks of max_length: one record of the whole stream.
            return [{"text": _words(generator, count * (length + 8))}]
        return [{"instruction": _words(generator, 6), "input": "",
                 "output": _words(generator, length + 8)} for _ in range(count)]

    train_count = settings.batch_size * settings.steps + settings.batch_size
    paths = []
    for name, count in (("train", train_count), ("eval", settings.eval_batch_size)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records(count)), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def train_command(model_folder: Path, train_file: Path, eval_file: Path, run_folder: Path,
                  settings: ProbeSettings) -> list[str]:
    """The `deltatune train` command line of one probe run."""
    command = [sys.executable, "-m", "deltatune", "train", "--model", str(model_folder),
               "--task", settings.task, "--method", settings.method,
               "--train", str(train_file), "--eval", str(eval_file),
               "--max-length", str(settings.max_length),
               "--batch-size", str(settings.batch_size),
               "--max-steps", str(settings.steps), "--eval-batch-size",
               str(settings.eval_batch_size), "--log-every", "1", "--no-baseline",
               "--probe", settings.probe, "--allocator", settings.allocator,
               "--base-dtype", settings.base_dtype, "--seed", str(settings.seed),
               "--warmup-steps", "0", "--no-progress", "--output-dir", str(run_folder)]
    if settings.task == "causal-lm":
        # The synthetic records are plain instructions; perplexity needs no generation.
        command += ["--metric", "perplexity", "--template", "alpaca"]
    if settings.activation_checkpointing:
        command.append("--activation-checkpointing")
    if settings.threads:
        command += ["--threads", str(settings.threads)]
    for key, value in settings.options.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        command += ["-o", f"{key}={text}"]
    return command


def read_probe_run(run_folder: Path, layers: int) -> ProbeRun:
    """Peak memory, parameter counts and per-step times of a finished probe run."""
    summary = json.loads((run_folder / "summary.json").read_text(encoding="utf-8"))
    elapsed = []
    metrics = run_folder / "metrics.jsonl"
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if "elapsed_seconds" in record and "loss" in record:
            elapsed.append(float(record["elapsed_seconds"]))
    steps = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    return ProbeRun(layers=layers, peak_memory_bytes=int(summary["peak_memory_bytes"]),
                    step_seconds=[round(s, 4) for s in steps],
                    trainable_parameters=summary.get("trainable_parameters"),
                    total_parameters=summary.get("total_parameters"),
                    quantization=summary.get("quantization"))


def run_probe(model_folder: Path, settings: ProbeSettings, layers: int, workdir: Path,
              timeout: float | None = None) -> ProbeRun:
    """One probe run of the `layers`-layer model in `model_folder` in a fresh process; a run
    that fails (the method does not apply to this model, say) comes back with its error line."""
    data = workdir / "data"
    if not (data / "train.jsonl").is_file():
        write_probe_data(settings.task, settings, data)
    run_folder = workdir / f"run-{settings.method}-{layers}"
    command = train_command(model_folder, data / "train.jsonl", data / "eval.jsonl",
                            run_folder, settings)
    environment = dict(os.environ)
    environment.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeRun(layers=layers, wall_seconds=time.perf_counter() - started,
                        error=f"probe run exceeded {timeout:.0f} s")
    wall = time.perf_counter() - started
    if done.returncode != 0 or not (run_folder / "summary.json").is_file():
        return ProbeRun(layers=layers, wall_seconds=wall, error=_failure_line(done.stderr))
    run = read_probe_run(run_folder, layers)
    run.wall_seconds = wall
    return run


def _failure_line(stderr: str) -> str:
    """The `error: ...` line of a failed run, else the end of its output."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return (lines[-1] if lines else "the probe run failed without output")[-_ERROR_TAIL:]
