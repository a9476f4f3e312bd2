"""Compression benchmark (issue 15): pruning and distillation experiments on the packaged models
and the shared data, each through the same library calls `deltatune prune` / `deltatune distill`
make, each writing its summary to benchmarks/compression_<name>.json (and its curve PNG beside
it) and printing a table. The reference points are the unpruned model (or the student trained
without KD) measured in the same run, and the published shape where there is one (Wanda paper,
LLaMA-2-7B at 50 %: dense 5.12, magnitude 14.89, Wanda 6.42 WikiText-2 perplexity).

    python benchmarks/compression.py heads-sst2        # head pruning sweep on MiniLM + SST-2
    python benchmarks/compression.py unstructured      # magnitude / Wanda 50 %, 80 % on SmolLM2
    python benchmarks/compression.py layers            # drop 25 % of SmolLM2's layers, heal
    python benchmarks/compression.py kd-sst2           # 3-layer student: labels vs word KD
    python benchmarks/compression.py seqkd-dates       # none / word / seq / seq-inter students

Teachers (trained once into --work, reused): a full fine-tune of minilm-l6 on the first 8,000
SST-2 sentences (1 epoch, lr 1e-4, batch 32) and the quickstart LoRA of smollm2-135m on the
built-in dates task. Nothing else should run on the machine meanwhile (see RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltatune.data import DataConfig  # noqa: E402
from deltatune.eval.config import EvalConfig  # noqa: E402
from deltatune.jobs.distill import DistillRequest, distill_saved  # noqa: E402
from deltatune.jobs.prune import HealSettings, PruneRequest, prune_saved  # noqa: E402
from deltatune.quant.precision import cpu_flags, cpu_name  # noqa: E402
from deltatune.spec import parse_run_spec  # noqa: E402
from deltatune.train.config import TrainConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SST2 = DataConfig(train=str(DATA / "sst2/train.tsv"), eval=str(DATA / "sst2/dev.tsv"),
                  columns={"text": "sentence"}, eval_columns={"text": "content"},
                  max_length=64, train_limit=8000)
WIKITEXT = DataConfig(train=str(DATA / "text/wikitext2_valid.txt"),
                      eval=str(DATA / "text/wikitext2_test.txt"), max_length=256,
                      train_limit=1500, eval_limit=600)
DATES = DataConfig(builtin="dates", builtin_train_size=400, builtin_eval_size=100)


def sst2_teacher(work: Path) -> Path:
    run = work / "sst2_teacher"
    if not (run / "summary.json").is_file():
        from deltatune.jobs import run_training
        shutil.rmtree(run, ignore_errors=True)
        run_training(parse_run_spec({
            "model": "minilm-l6", "task": "classification", "method": "full",
            "data": _as_dict(SST2), "output_dir": str(run), "progress": False,
            "train": {"epochs": 1, "learning_rate": 1e-4, "batch_size": 32}}))
    return run


def dates_teacher(work: Path) -> Path:
    run = work / "dates_teacher"
    if not (run / "summary.json").is_file():
        from deltatune.cli import QUICKSTART_PRESET
        from deltatune.jobs import run_training
        shutil.rmtree(run, ignore_errors=True)
        run_training(parse_run_spec({**QUICKSTART_PRESET, "output_dir": str(run),
                                     "progress": False}))
    return run


def _as_dict(data: DataConfig) -> dict:
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(data).items() if v is not None}


def heads_sst2(work: Path, args) -> dict:
    summary = prune_saved(PruneRequest(
        source=str(sst2_teacher(work)), kind="heads", amounts=[0.2, 0.4, 0.5, 0.6, 0.8],
        out=str(work / "heads_sst2"), options={"iterations": 4}, calibration_examples=256,
        heal=HealSettings(mode="full", steps=args.heal_steps), overwrite=True,
        progress=False))
    rows = [("unpruned", 72, summary["unpruned"], None)]
    for result in summary["results"]:
        rows.append((f"{result['amount']:.0%}", result["details"]["heads_after"],
                     result["pruned"], result["healed"]))
    print(f"{'removed':>8} {'heads':>5} {'params':>11} {'ms/batch':>9} {'acc pruned':>10} "
          f"{'acc healed':>10}")
    for name, heads, pruned, healed in rows:
        print(f"{name:>8} {heads:>5} {pruned['parameters']:>11,} "
              f"{pruned['latency_ms_per_batch']:>9.1f} {pruned['metrics']['accuracy']:>10.4f} "
              f"{healed['metrics']['accuracy'] if healed else float('nan'):>10.4f}")
    return summary


def unstructured(work: Path, args) -> dict:
    results = {}
    for kind in ("magnitude", "wanda"):
        results[kind] = prune_saved(PruneRequest(
            source="smollm2-135m", task="text", kind=kind, amounts=[0.5, 0.8],
            data=WIKITEXT, out=str(work / f"unstructured_{kind}"), calibration_examples=128,
            calibration_batch_size=8, eval=EvalConfig(batch_size=8), overwrite=True,
            progress=False))
    dense = results["magnitude"]["unpruned"]
    print(f"dense: perplexity {dense['metrics']['perplexity']:.2f}")
    print(f"{'kind':>10} {'sparsity':>8} {'perplexity':>11} {'bytes on disk':>14}")
    for kind, summary in results.items():
        for result in summary["results"]:
            print(f"{kind:>10} {result['amount']:>8.0%} "
                  f"{result['pruned']['metrics']['perplexity']:>11.2f} "
                  f"{result['pruned']['bytes_on_disk']:>14,}")
    return results


def layers(work: Path, args) -> dict:
    summary = prune_saved(PruneRequest(
        source="smollm2-135m", task="text", kind="layers", amounts=[0.25], data=WIKITEXT,
        out=str(work / "layers_smollm2"), calibration_examples=64, calibration_batch_size=8,
        heal=HealSettings(mode="lora", steps=args.heal_steps, batch_size=4,
                          learning_rate=5e-4),
        eval=EvalConfig(batch_size=8), overwrite=True, progress=False))
    result = summary["results"][0]
    print(f"unpruned: perplexity {summary['unpruned']['metrics']['perplexity']:.2f}, "
          f"{summary['unpruned']['parameters']:,} parameters")
    print(f"removed layers {result['details']['removed']}: pruned perplexity "
          f"{result['pruned']['metrics']['perplexity']:.2f}, healed "
          f"{result['healed']['metrics']['perplexity']:.2f} ({args.heal_steps} LoRA steps), "
          f"{result['pruned']['parameters']:,} parameters")
    return summary


def kd_sst2(work: Path, args) -> dict:
    teacher = sst2_teacher(work)
    results = {}
    for kind in ("none", "word"):
        results[kind] = distill_saved(DistillRequest(
            teacher=str(teacher), out=str(work / f"kd_sst2_{kind}"), kind=kind,
            student_layers=3, train=TrainConfig(learning_rate=1e-4, max_steps=args.steps,
                                                batch_size=32),
            temperature=2.0, kd_weight=1.0, overwrite=True, progress=False))
    print(f"teacher (6 layers) accuracy "
          f"{results['none']['teacher_stage']['metrics']['accuracy']:.4f}")
    for kind, summary in results.items():
        print(f"student 3 layers, {kind:>5}: accuracy "
              f"{summary['student_stage']['metrics']['accuracy']:.4f} (before training "
              f"{summary['student_before_training']['accuracy']:.4f})")
    return results


def seqkd_dates(work: Path, args) -> dict:
    teacher = dates_teacher(work)
    results = {}
    for kind in ("none", "word", "seq", "seq-inter"):
        results[kind] = distill_saved(DistillRequest(
            teacher=str(teacher), out=str(work / f"seqkd_dates_{kind}"), kind=kind,
            student_layers=args.student_layers, method="lora",
            method_options={"r": 16, "alpha": 32, "targets": "all-linear"},
            train=TrainConfig(learning_rate=1e-3, epochs=args.epochs, batch_size=8),
            beams=4, max_new_tokens=24, cache_dir=str(work / "dates_teacher_caches"),
            eval=EvalConfig(max_new_tokens=16, baseline=False), overwrite=True,
            progress=False))
    print(f"teacher exact match {results['none']['teacher_stage']['metrics']['exact_match']:.3f}")
    print(f"{'kind':>10} {'exact match':>11} {'eval loss':>9}")
    for kind, summary in results.items():
        metrics = summary["student_stage"]["metrics"]
        print(f"{kind:>10} {metrics['exact_match']:>11.3f} {metrics['loss']:>9.4f}")
    return results


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
EXPERIMENTS = {"heads-sst2": heads_sst2, "unstructured": unstructured, "layers": layers,
               "kd-sst2": kd_sst2, "seqkd-dates": seqkd_dates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--work", default="/tmp/deltatune_compression",
                        help="folder for teachers and run directories (default %(default)s)")
    parser.add_argument("--heal-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300, help="kd-sst2 student steps")
    parser.add_argument("--epochs", type=int, default=1, help="seqkd-dates student epochs")
    parser.add_argument("--student-layers", type=int, default=20,
                        help="seqkd-dates: SmolLM2 cut from 30 to this many layers")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = sorted(flag for flag in cpu_flags() if flag in SPEED_FLAGS)
    print(f"cpu: {cpu_name()} ({', '.join(flags) or 'no AVX2'}), torch threads "
          f"{torch.get_num_threads()}")
    result = EXPERIMENTS[args.experiment](work, args)
    name = args.experiment.replace("-", "_")
    out = ROOT / "benchmarks" / f"compression_{name}.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args), "result": result},
                              indent=1, default=str) + "\n")
    for png in sorted(work.glob("*/curve.png")):
        if png.parent.name.startswith(name.split("_")[0]):
            shutil.copy(png, ROOT / "benchmarks" / f"compression_{png.parent.name}.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
