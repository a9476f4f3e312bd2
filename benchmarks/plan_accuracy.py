"""How close `deltatune plan`'s estimates are to real runs: for each setting (model, task, method,
batch size, max length) the plan's probe runs (copies with a quarter and a half of the layers,
extrapolated), then a real `deltatune train` run of the full model with the same command line —
same synthetic data that
fills every batch, same steps, same flags — and the estimated against the measured peak memory
(`peak_memory_bytes` of summary.json: peak RSS on CPU) and seconds per step. The acceptance bar
is 15 % on memory. Prints a markdown table and the CPU; writes benchmarks/plan_accuracy.json
(after every setting, so an interrupted run keeps what it measured).

    flock /tmp/cpu.lock .venv/bin/python benchmarks/plan_accuracy.py [--only smollm2-135m]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltatune.fileio import write_json  # noqa: E402
from deltatune.plan.planner import (PlanRequest, model_source, probe_methods,  # noqa: E402
                                    settings_for, write_probe_models)
from deltatune.plan.probe import read_probe_run, train_command  # noqa: E402
from deltatune.quant.precision import cpu_name  # noqa: E402

RESULTS = ROOT / "benchmarks" / "plan_accuracy.json"
TOLERANCE = 0.15
SETTINGS = [
    ("smollm2-135m", "causal-lm", "lora", 4, 256),
    ("smollm2-135m", "causal-lm", "lora", 8, 128),
    ("smollm2-135m", "causal-lm", "full", 4, 128),
    ("smollm2-135m", "causal-lm", "ia3", 4, 256),
    ("smollm2-135m", "causal-lm", "prefix", 4, 256),
    ("smollm2-135m", "causal-lm", "adapter", 2, 512),
    ("smollm2-135m", "causal-lm", "qlora", 4, 256),
    ("minilm-l6", "classification", "full", 32, 64),
    # LoRA's default targets (q_proj, v_proj) do not exist in BERT: the plan reports it as not
    # measurable, as `deltatune train --method lora` refuses it; freeze and prompt instead.
    ("minilm-l6", "classification", "lora", 32, 128),
    ("minilm-l6", "classification", "freeze", 32, 128),
    ("minilm-l6", "classification", "prompt", 32, 128),
    ("minilm-l6", "classification", "adapter", 64, 64),
    ("minilm-l6", "classification", "prefix", 32, 128),
    ("minilm-l6", "classification", "ia3", 16, 256),
]


def measure(model: str, settings, workdir: Path) -> dict:
    """The real run: the probe's own command line with the full model in place of the probe."""
    run_folder = workdir / f"real-{settings.method}"
    command = train_command(model, workdir / "data" / "train.jsonl",
                            workdir / "data" / "eval.jsonl", run_folder, settings)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    run = read_probe_run(run_folder, 0)
    return {"peak_bytes": run.peak_memory_bytes, "seconds_per_step": run.seconds_per_step(),
            "step_seconds": run.step_seconds, "trainable_parameters": run.trainable_parameters,
            "total_parameters": run.total_parameters,
            "wall_seconds": round(time.perf_counter() - started, 1)}


def one_setting(model: str, task: str, method: str, batch: int, length: int, models: dict,
                layers: int, root: Path) -> dict:
    request = PlanRequest(model=model, task=task, methods=[method], batch_size=batch,
                          max_length=length)
    workdir = root / f"{model}-{method}-{batch}-{length}"
    started = time.perf_counter()
    (estimate,) = probe_methods(request, models, layers, workdir)
    plan_seconds = time.perf_counter() - started
    row = {"model": model, "task": task, "method": method, "batch": batch, "length": length,
           "plan_seconds": round(plan_seconds, 1), "estimate": estimate.to_dict()}
    if not estimate.measurable:
        row["error"] = estimate.error
        return row
    real = measure(model, settings_for(request, method), workdir)
    row["measured"] = real
    if "peak_bytes" in real:
        row["memory_error"] = estimate.peak_bytes / real["peak_bytes"] - 1
        if real["seconds_per_step"] and estimate.seconds_per_step:
            row["time_error"] = estimate.seconds_per_step / real["seconds_per_step"] - 1
    return row


def table(rows: list[dict]) -> str:
    header = ("model | method | batch | length | estimated peak | measured peak | error % | "
              "est. s/step | measured s/step")
    lines = [f"| {header} |", "|" + "---|" * 9]
    for r in rows:
        real = r.get("measured", {})
        est = r["estimate"]
        if "memory_error" not in r:
            reason = r.get("error") or real.get("error")
            lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['length']} | "
                         f"{reason} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['length']} | "
                     f"{est['peak_bytes'] / 1e9:.2f} GB | {real['peak_bytes'] / 1e9:.2f} GB | "
                     f"{100 * r['memory_error']:+.1f} | {est['seconds_per_step']:.2f} | "
                     f"{real['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def _earlier_rows() -> list[dict]:
    import json
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []


def _in_setting_order(rows: list[dict]) -> list[dict]:
    order = {(s[0], s[2], s[3], s[4]): i for i, s in enumerate(SETTINGS)}
    return sorted(rows, key=lambda r: order.get((r["model"], r["method"], r["batch"],
                                                 r["length"]), len(order)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one model name, or model:method")
    args = parser.parse_args()
    chosen = [s for s in SETTINGS if not args.only or args.only in (s[0], f"{s[0]}:{s[2]}")]
    print(f"CPU: {cpu_name()}", flush=True)
    # With --only, the other settings' rows of an earlier run are kept.
    key = ("model", "method", "batch", "length")
    chosen_keys = {(s[0], s[2], s[3], s[4]) for s in chosen}
    kept = [r for r in _earlier_rows() if tuple(r[k] for k in key) not in chosen_keys]
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    try:
        for model in dict.fromkeys(s[0] for s in chosen):
            task = next(s[1] for s in chosen if s[0] == model)
            source = model_source(model, task, num_labels=2)
            layers = int(source.config.num_hidden_layers)
            models = write_probe_models(source, root / model)
            for setting in [s for s in chosen if s[0] == model]:
                row = one_setting(*setting, models, layers, root)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                write_json(RESULTS, {"cpu": cpu_name(), "tolerance": TOLERANCE,
                                     "rows": _in_setting_order(kept + rows)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = _in_setting_order(kept + rows)
    print(f"\nCPU: {cpu_name()}\n\n{table(rows)}")
    within = [r for r in rows if "memory_error" in r and abs(r["memory_error"]) <= TOLERANCE]
    measured = [r for r in rows if "memory_error" in r]
    print(f"\nwithin {TOLERANCE:.0%} of the measured peak: {len(within)} of {len(measured)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
