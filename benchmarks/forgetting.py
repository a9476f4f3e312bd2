"""Forgetting benchmark (issue 16): how much a fine-tune forgets and how much each mitigation
saves, through the same library calls `deltatune train`, `sequential` and `interpolate` make.
Each experiment writes benchmarks/forgetting_<name>.json and prints a table; the reference is
the unmitigated run measured in the same invocation.

    python benchmarks/forgetting.py alpaca       # SmolLM2, LoRA (320 examples) and full FT
                                                 #   (160) on Alpaca:
                                                 #   none / KL / replay / L2-SP
    python benchmarks/forgetting.py sst2-trec    # MiniLM full FT, SST-2 then TREC:
                                                 #   none / EWC / replay / L2-SP
    python benchmarks/forgetting.py wise         # WiSE-FT alpha sweep of the Alpaca LoRA run
    python benchmarks/forgetting.py quickstart   # the default probe on the quickstart run

Retention is measured on data no run trains on: C4 (first 32 blocks of 256 tokens) and
WikiText-2 test; replay mixes in WikiText-2 *valid*, so the measured text is never replayed.
Penalty weights are calibrated, not tuned: after the unmitigated run, the L2-SP (and, for
sst2-trec, EWC) value of its final weights is measured and the weight is set so that the penalty
would equal `--penalty-share` times that run's final task loss (saved with the result). Nothing else
should run on the machine meanwhile (see RESULTS.md).
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

from deltatune.jobs import run_training  # noqa: E402
from deltatune.quant.precision import cpu_flags, cpu_name  # noqa: E402
from deltatune.spec import parse_run_spec  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
RETAIN_TEXT = [{"path": str(DATA / "text/c4_demo.jsonl"), "name": "c4", "limit": 32},
               {"path": str(DATA / "text/wikitext2_test.txt"), "name": "wikitext", "limit": 32}]
REPLAY_TEXT = {"path": str(DATA / "text/wikitext2_valid.txt"), "limit": 400}
ALPACA_METHODS = {
    "lora": {"method": "lora", "method_options": {"r": 16, "alpha": 32,
                                                  "targets": ["all-linear"]},
             "learning_rate": 1e-3, "train_limit": 320},
    # Half the examples: a full fine-tuning step costs ~2x a LoRA step on this CPU.
    "full": {"method": "full", "method_options": {}, "learning_rate": 5e-5, "train_limit": 160},
}


def _alpaca_spec(work: Path, method: str, mitigation: str, args, forgetting: dict) -> dict:
    settings = ALPACA_METHODS[method]
    return {
        "model": "smollm2-135m", "task": "causal-lm", "method": settings["method"],
        "method_options": settings["method_options"], "progress": False,
        "output_dir": str(work / f"alpaca-{method}-{mitigation}"),
        "data": {"train": str(DATA / "instruct/alpaca_en_demo.json"), "template": "chat",
                 "max_length": 256, "eval_limit": 48,
                 "train_limit": args.train_limit or settings["train_limit"],
                 "eval_fraction": 0.1},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": settings["learning_rate"],
                  "warmup_ratio": 0.05},
        "eval": {"metric": "perplexity", "retain": RETAIN_TEXT, "batch_size": 8},
        "forgetting": forgetting}


def _train(raw: dict) -> dict:
    out = Path(raw["output_dir"])
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = run_training(parse_run_spec(raw)).as_dict()
    summary["benchmark_wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _moved_distance(run: Path, fisher_data: dict | None = None) -> float:
    """The L2-SP value (weight 1) of a finished run's weights: how far training moved them
    from where it started (the base model, or the `init_from` run's weights); with
    `fisher_data` (a RetainSet mapping) the EWC value instead, the Fisher estimated there as
    `deltatune sequential` does."""
    from deltatune.forgetting.l2sp import L2SPPenalty
    from deltatune.jobs.starting_point import load_starting_weights
    from deltatune.jobs.tasks import get_task
    from deltatune.methods import apply, make_config
    from deltatune.methods.adapter_io import WEIGHTS_NAME, read_adapter_weights
    from deltatune.models import load_model
    from deltatune.spec import read_run_spec
    spec = read_run_spec(run)
    task = get_task(spec.task)
    labels = task.saved_labels(run)
    from deltatune.jobs.preparation import set_seed
    set_seed(spec.seed)  # the head's fresh rows as the run initialised them
    loaded = load_model(spec.model, task=task.model_kind,
                        num_labels=len(labels) if labels else None, label_names=labels)
    if spec.init_from:
        load_starting_weights(loaded.model, spec.init_from)
    config = make_config(spec.method, spec.method_options)
    task.adjust_method(config, loaded.model, spec.method_options)
    config.prepare(loaded.tokenizer)
    handle = apply(loaded.model, config)
    heads = [] if spec.init_from else [n for n in task.new_head_names
                                       if n in dict(loaded.model.named_children())]
    penalty = L2SPPenalty(handle, 1.0, exclude=heads) if fisher_data is None else \
        _ewc_penalty(handle, loaded, task, labels, fisher_data, heads)
    handle.load_state_dict(read_adapter_weights(run / "adapter" / WEIGHTS_NAME))
    with torch.no_grad():
        return float(penalty(loaded.model, {}, None))


def _ewc_penalty(handle, loaded, task, labels, fisher_data: dict, heads: list[str]):
    from deltatune.data.collate import pad_batch
    from deltatune.data.retain import RetainSet, encode_retain_examples
    from deltatune.forgetting.ewc import EWCPenalty
    from deltatune.jobs.forgetting import FISHER_BATCH_SIZE
    examples = encode_retain_examples(RetainSet(**fisher_data), loaded.tokenizer,
                                      "classification", 64, labels)
    pad = loaded.tokenizer.pad_token_id
    batches = [pad_batch(examples[i:i + FISHER_BATCH_SIZE], pad)
               for i in range(0, len(examples), FISHER_BATCH_SIZE)]
    objective = task.objective()
    return EWCPenalty.for_handle(handle, batches, lambda m, b: objective(m, b).loss, weight=1.0,
                                 max_batches=32, exclude=heads)


def _forgetting_row(summary: dict) -> dict:
    retention = summary["forgetting"]["retention"]
    final = summary["final_metrics"]
    return {"task_eval_loss": final["loss"], "task_perplexity": final["perplexity"],
            "c4_before": retention["retain_c4_perplexity"]["before"],
            "c4_after": retention["retain_c4_perplexity"]["after"],
            "c4_increase": retention["retain_c4_perplexity"]["change"],
            "wikitext_increase": retention["retain_wikitext_perplexity"]["change"],
            "probe_kl": final.get("probe_kl"),
            "train_seconds": summary["train_wall_seconds"],
            "terms": summary["final_train_loss_terms"]}


def alpaca(work: Path, args) -> dict:
    result = {}
    for method in args.methods.split(","):
        rows = {"none": _forgetting_row(_train(_alpaca_spec(work, method, "none", args, {})))}
        moved = _moved_distance(work / f"alpaca-{method}-none")
        l2sp_weight = args.penalty_share * rows["none"]["task_eval_loss"] / max(moved, 1e-12)
        mitigations = {"kl": {"kl_weight": args.kl_weight},
                       "replay": {"replay": REPLAY_TEXT, "replay_fraction": 0.25},
                       "l2sp": {"l2sp_weight": l2sp_weight}}
        for name, forgetting in mitigations.items():
            rows[name] = _forgetting_row(_train(_alpaca_spec(work, method, name, args,
                                                             forgetting)))
        base = rows["none"]
        for name, row in rows.items():
            for measure in ("c4_increase", "wikitext_increase", "probe_kl"):
                row[f"{measure}_cut"] = round(1 - row[measure] / base[measure], 4) \
                    if base[measure] and base[measure] > 0 else None
            row["task_loss_vs_none"] = round(row["task_eval_loss"] / base["task_eval_loss"] - 1,
                                             4)
        result[method] = {"rows": rows, "l2sp_weight": l2sp_weight, "l2sp_moved": moved}
        _print_alpaca(method, rows)
    return result


def _print_alpaca(method: str, rows: dict) -> None:
    print(f"\n{method}: C4 perplexity {rows['none']['c4_before']:.2f} before training")
    print(f"{'mitigation':<10} {'task loss':>9} {'vs none':>8} {'C4 ppl':>8} {'+C4':>8} "
          f"{'cut':>6} {'+wiki':>8} {'cut':>6} {'probe KL':>9} {'cut':>6} {'train s':>8}")

    def cut(value):
        return f"{value:.0%}" if value is not None else "-"
    for name, row in rows.items():
        print(f"{name:<10} {row['task_eval_loss']:>9.4f} {row['task_loss_vs_none']:>+8.1%} "
              f"{row['c4_after']:>8.2f} {row['c4_increase']:>+8.2f} "
              f"{cut(row['c4_increase_cut']):>6} {row['wikitext_increase']:>+8.2f} "
              f"{cut(row['wikitext_increase_cut']):>6} {row['probe_kl'] or 0:>9.4f} "
              f"{cut(row['probe_kl_cut']):>6} {row['train_seconds']:>8.0f}")


SST2 = {"train": str(DATA / "sst2/train.tsv"), "eval": str(DATA / "sst2/dev.tsv"),
        "columns": {"text": "sentence"}, "eval_columns": {"text": "content"},
        "max_length": 64}
TREC = {"train": str(DATA / "trec/train.tsv"), "eval": str(DATA / "trec/test.tsv"),
        "max_length": 64}


def _stage_config(work: Path, name: str, data: dict, args) -> Path:
    import yaml
    raw = {"model": "minilm-l6", "task": "classification", "method": "full",
           "data": {**data, "train_limit": args.stage_limit},
           "train": {"epochs": 1, "batch_size": 32, "learning_rate": 1e-4},
           "eval": {"baseline": False}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sst2_trec(work: Path, args) -> dict:
    from deltatune.jobs.sequential import SequentialRequest, run_sequential
    sst2, trec = _stage_config(work, "sst2", SST2, args), _stage_config(work, "trec", TREC, args)
    first = work / "sst2-run"
    if not (first / "summary.json").is_file():
        raw = parse_run_spec({**__import__("yaml").safe_load(sst2.read_text()),
                              "output_dir": str(first), "progress": False})
        shutil.rmtree(first, ignore_errors=True)
        run_training(raw)
    results = {"none": run_sequential(SequentialRequest([str(first), str(trec)],
                                                        str(work / "seq-none"), {},
                                                        progress=False))}
    stage_two = work / "seq-none" / "02-trec"
    moved = _moved_distance(stage_two)
    final_loss = json.loads((stage_two / "summary.json").read_text())["final_metrics"]["loss"]
    l2sp_weight = args.penalty_share * final_loss / max(moved, 1e-12)
    fisher_data = {"path": SST2["train"], "columns": SST2["columns"],
                   "limit": args.stage_limit}
    ewc_moved = _moved_distance(stage_two, fisher_data)
    ewc_weight = args.penalty_share * final_loss / max(ewc_moved, 1e-12)
    variants = {"ewc": {"ewc_weight": ewc_weight, "ewc_batches": 32},
                "replay": {"replay_fraction": 0.25},
                "l2sp": {"l2sp_weight": l2sp_weight}}
    for name, mitigation in variants.items():
        results[name] = run_sequential(SequentialRequest([str(first), str(trec)],
                                                         str(work / f"seq-{name}"), mitigation,
                                                         progress=False))
    print(f"\nMiniLM full fine-tuning, SST-2 ({args.stage_limit} sentences) then TREC")
    print(f"{'mitigation':<10} {'SST-2 after A':>13} {'SST-2 after B':>13} {'forgot':>8} "
          f"{'TREC':>8}")
    for name, summary in results.items():
        first_task, second_task = summary["stages"]
        after = summary["rows"][-1]["metrics"]
        print(f"{name:<10} {summary['first_task_before']:>13.4f} {after[first_task]:>13.4f} "
              f"{summary['forgetting_of_first_task']:>+8.4f} {after[second_task]:>8.4f}")
    return {"variants": results, "l2sp_weight": l2sp_weight, "l2sp_moved": moved,
            "ewc_weight": ewc_weight, "ewc_moved": ewc_moved}


def wise(work: Path, args) -> dict:
    from deltatune.data.retain import RetainSet
    from deltatune.jobs.interpolate import InterpolateRequest, interpolate_run
    run = work / "alpaca-lora-none"
    if not (run / "summary.json").is_file():
        raise SystemExit("run `python benchmarks/forgetting.py alpaca` first (it trains the "
                         "LoRA run this sweep interpolates)")
    alphas = [round(0.2 * i, 2) for i in range(6)]
    summary = interpolate_run(InterpolateRequest(
        run=str(run), alphas=alphas, retain=[RetainSet(**r) for r in RETAIN_TEXT],
        out=str(work / "wise-alpaca-lora"), overwrite=True, progress=False))
    png = work / "wise-alpaca-lora" / "tradeoff.png"
    if png.is_file():
        shutil.copy(png, ROOT / "benchmarks" / "forgetting_wise.png")
    return summary


def quickstart(work: Path, args) -> dict:
    from deltatune.cli import QUICKSTART_PRESET
    raw = {**QUICKSTART_PRESET, "output_dir": str(work / "quickstart"), "progress": False}
    summary = _train(raw)
    forgetting = summary["forgetting"]
    print(f"\nquickstart: exact match {summary['baseline_metrics']['exact_match']:.2f} -> "
          f"{summary['final_metrics']['exact_match']:.2f}; probe KL "
          f"{summary['final_metrics']['probe_kl']:.4f}; probe cost "
          f"{forgetting['probe_seconds']:.1f} s of {summary['train_wall_seconds']:.0f} s "
          "training")
    return {"baseline": summary["baseline_metrics"], "final": summary["final_metrics"],
            "forgetting": forgetting, "train_wall_seconds": summary["train_wall_seconds"]}


EXPERIMENTS = {"alpaca": alpaca, "sst2-trec": sst2_trec, "wise": wise, "quickstart": quickstart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--work", default="/tmp/deltatune_forgetting",
                        help="folder for the run directories (default %(default)s)")
    parser.add_argument("--methods", default="lora,full", help="alpaca: methods to run")
    parser.add_argument("--train-limit", type=int,
                        help="alpaca: training examples (1 epoch, batch 8; default 320 for "
                        "LoRA, 160 for full fine-tuning)")
    parser.add_argument("--stage-limit", type=int, default=4000,
                        help="sst2-trec: training sentences per stage")
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--penalty-share", type=float, default=1.0,
                        help="L2-SP weight calibration (see the module docstring)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = sorted(flag for flag in cpu_flags() if flag in SPEED_FLAGS)
    print(f"cpu: {cpu_name()} ({', '.join(flags) or 'no AVX2'}), torch threads "
          f"{torch.get_num_threads()}")
    result = EXPERIMENTS[args.experiment](work, args)
    out = ROOT / "benchmarks" / f"forgetting_{args.experiment.replace('-', '_')}.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args), "result": result},
                              indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
