"""Adapter arithmetic benchmark (issue 18): two LoRA adapters trained on two built-in tasks
(`dates`: a written date to ISO; `numbers`: English number words to digits), then combined by
each merge method of `deltatune merge-adapters`, and every result scored by exact match on both
tasks' held-out eval sets. The reference points are measured in the same run: the base model,
and each adapter alone on its own task and on the other one.

    python benchmarks/adapter_merging.py [--work /tmp/deltatune_merging]

Training uses the quickstart settings (SmolLM2-135M, LoRA r16 alpha32 all-linear, lr 1e-3, 400
examples, 1 epoch); a finished training run in --work is reused. Writes
benchmarks/adapter_merging.json and prints a markdown table. Nothing else should run on the
machine meanwhile.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltatune.jobs import EvalRequest, evaluate_saved, run_training  # noqa: E402
from deltatune.quant.precision import cpu_flags, cpu_name  # noqa: E402
from deltatune.serve.arithmetic import MergeOptions, MergeRequest, merge_adapters  # noqa: E402
from deltatune.spec import parse_run_spec  # noqa: E402

TASKS = ("dates", "numbers")
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
# name: (method, weights, options) — all merge the dates and numbers adapters, in that order.
MERGES = {
    "linear 1,1": ("linear", [1.0, 1.0], {}),
    "linear 0.5,0.5": ("linear", [0.5, 0.5], {}),
    "ties d0.5 r16": ("ties", [1.0, 1.0], {"density": 0.5}),
    "ties d0.5 r32": ("ties", [1.0, 1.0], {"density": 0.5, "rank": 32}),
    "dare_linear d0.5 r32": ("dare_linear", [1.0, 1.0], {"density": 0.5, "rank": 32}),
    "dare_ties d0.5 r32": ("dare_ties", [1.0, 1.0], {"density": 0.5, "rank": 32}),
}


def train(work: Path, task: str) -> Path:
    from deltatune.cli import QUICKSTART_PRESET
    run = work / task
    if (run / "summary.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    raw = json.loads(json.dumps(QUICKSTART_PRESET))
    raw["data"]["builtin"] = task
    raw.update({"output_dir": str(run), "progress": False})
    started = time.perf_counter()
    run_training(parse_run_spec(raw))
    print(f"trained {task} in {time.perf_counter() - started:.0f} s")
    return run


def score(runs: dict[str, Path], adapter: Path | None) -> dict[str, float]:
    """Exact match of `adapter` (None: the base model) on each task's eval split."""
    scores = {}
    for task, run in runs.items():
        if adapter is None:
            summary = json.loads((run / "summary.json").read_text())
            scores[task] = summary["baseline_metrics"]["exact_match"]
            continue
        metrics = evaluate_saved(EvalRequest(run=str(run), adapter=str(adapter),
                                             progress=False))
        scores[task] = metrics["exact_match"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/deltatune_merging",
                        help="folder for the runs and merged adapters (default %(default)s)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = sorted(flag for flag in cpu_flags() if flag in SPEED_FLAGS)
    print(f"cpu: {cpu_name()} ({', '.join(flags) or 'no AVX2'}), torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    runs = {task: train(work, task) for task in TASKS}
    rows = [{"adapter": "base model", **score(runs, None)}]
    for task, run in runs.items():
        rows.append({"adapter": f"{task} alone", **score(runs, run / "adapter")})
    for name, (method, weights, options) in MERGES.items():
        out = work / "merged" / name.replace(" ", "_").replace(",", "_")
        report = merge_adapters(MergeRequest(
            adapters=[str(runs[task]) for task in TASKS], out=str(out), method=method,
            weights=weights, options=MergeOptions(**options), overwrite=True, progress=False))
        energy = report.get("energy_kept", {})
        rows.append({"adapter": name, **score(runs, out), "rank": report.get("rank"),
                     "merge_seconds": report["seconds"], "bytes": report["bytes"],
                     "energy_kept_mean": energy.get("mean")})
    for row in rows:
        row["mean"] = round(sum(row[task] for task in TASKS) / len(TASKS), 3)
    print("\n| adapter | dates EM | numbers EM | mean | rank | energy kept | merge s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        energy = row.get("energy_kept_mean")
        print(f"| {row['adapter']} | {row['dates']:.2f} | {row['numbers']:.2f} | "
              f"{row['mean']:.2f} | {row.get('rank') or ''} | "
              f"{'' if energy is None else f'{energy:.3f}'} | {row.get('merge_seconds', '')} |")
    out = ROOT / "benchmarks" / "adapter_merging.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
