"""SST-2 quality, side by side: Hugging Face PEFT + Trainer (the peer) and deltatune, LoRA r=8 on
query/value of MiniLM-L6, the first N training sentences, one epoch, lr 1e-3, batch 32, max length
64, evaluated on the full dev set. Each side runs in its own subprocess so peak memory is its own.

    python benchmarks/sst2_quality.py                 # both sides, 4,000 sentences
    python benchmarks/sst2_quality.py --train-limit 0 # the full 67k training set
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def read_tsv(path: Path, text_column: str, limit: int | None) -> tuple[list[str], list[int]]:
    import csv
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r[text_column] for r in rows], [int(r["label"]) for r in rows]


def run_peer(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)
    from deltatune.models.registry import KNOWN_MODELS

    folder = str(KNOWN_MODELS["minilm-l6"].locate())
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=args.alpha,
                                             target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def encode(texts, labels):
        encoded = tokenizer(texts, truncation=True, max_length=64)
        return [{"input_ids": i, "attention_mask": m, "token_type_ids": t, "labels": l}
                for i, m, t, l in zip(encoded["input_ids"], encoded["attention_mask"],
                                      encoded["token_type_ids"], labels)]

    train = encode(*read_tsv(DATA / "train.tsv", "sentence", args.train_limit or None))
    dev = encode(*read_tsv(DATA / "dev.tsv", "content", None))
    training_args = TrainingArguments(output_dir=args.scratch, learning_rate=1e-3,
                                      per_device_train_batch_size=32,
                                      per_device_eval_batch_size=64, num_train_epochs=1,
                                      report_to=[], save_strategy="no", seed=args.seed,
                                      logging_steps=50, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logits = trainer.predict(dev).predictions
    accuracy = float((np.argmax(logits, -1) == np.array([d["labels"] for d in dev])).mean())
    return {"side": "peer (PEFT + Trainer)", "accuracy": accuracy, "train_seconds": wall,
            "trainable_parameters": trainable}


def run_deltatune(args: argparse.Namespace) -> dict:
    from deltatune.jobs import run_training
    from deltatune.spec import parse_run_spec

    spec = parse_run_spec({
        "model": "minilm-l6", "task": "classification", "method": "lora",
        "method_options": {"r": 8, "alpha": args.alpha, "targets": ["query", "value"]},
        "data": {"train": str(DATA / "train.tsv"), "eval": str(DATA / "dev.tsv"),
                 "columns": {"text": "sentence"}, "eval_columns": {"text": "content"},
                 "train_limit": args.train_limit or None, "max_length": 64},
        "train": {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1},
        "eval": {"baseline": False, "batch_size": 64},
        "seed": args.seed, "output_dir": args.scratch, "progress": False})
    summary = run_training(spec)
    return {"side": "deltatune", "accuracy": summary["final_metrics"]["accuracy"],
            "train_seconds": summary["train_wall_seconds"],
            "trainable_parameters": summary["trainable_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["both", "peer", "deltatune"], default="both")
    parser.add_argument("--train-limit", type=int, default=4000, help="0 = all 67,349")
    parser.add_argument("--alpha", type=float, default=8, help="LoRA alpha (PEFT's default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default="/tmp/deltatune-sst2-bench")
    args = parser.parse_args()
    if args.side != "both":
        result = run_peer(args) if args.side == "peer" else run_deltatune(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for side in ("peer", "deltatune"):
        command = [sys.executable, __file__, "--side", side, "--train-limit",
                   str(args.train_limit), "--alpha", str(args.alpha), "--seed", str(args.seed),
                   "--scratch", f"{args.scratch}-{side}"]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.split("RESULT ", 1)[1]))
    print(f"SST-2 dev accuracy, MiniLM-L6 + LoRA r=8 (q,v), alpha {args.alpha:g}, "
          f"train_limit={args.train_limit or 'all'}, 1 epoch, lr 1e-3, batch 32, max_len 64")
    print(f"{'side':<24} {'accuracy':>9} {'train s':>9} {'peak RSS MB':>12} {'trainable':>10}")
    for r in results:
        print(f"{r['side']:<24} {r['accuracy']:>9.4f} {r['train_seconds']:>9.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['trainable_parameters']:>10,}")
    peer, ours = results
    print(f"ratio deltatune/peer: accuracy {ours['accuracy'] / peer['accuracy']:.3f}, "
          f"train time {ours['train_seconds'] / peer['train_seconds']:.2f}")


if __name__ == "__main__":
    main()
