"""The `deltatune prune` and `deltatune distill` subcommands: their flags and --help, turned into
a `PruneRequest` / `DistillRequest` (deltatune/jobs/prune.py, distill.py), whose summary they
print as JSON on stdout; stage lines and progress bars go to stderr. `deltatune/cli.py`
registers them; user mistakes raise DeltatuneError subclasses, which `cli.main` prints as one
`error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError

_PRUNE_DESCRIPTION = """\
Prune a model (or a trained run, its adapter merged first), heal it, and measure it.

What can be pruned (--kind):
  heads      attention heads, scored by the gradient of the loss w.r.t. a per-head gate
             (Michel et al. 2019) on a calibration sample, removed physically (smaller
             q/k/v/o); grouped-query models: --gqa query-heads (evenly per KV group, default)
             or kv-groups (whole groups, also shrinks the KV cache)
  neurons    FFN hidden neurons, by activation x gradient (--importance gradient, default)
             or mean |activation|, removed physically
  layers     whole blocks: lowest block influence, 1 - cos(input, output) (ShortGPT,
             default), or the smallest loss increase when skipped (--importance loss)
  magnitude  individual weights of the blocks' linear layers, smallest |w| per layer
             (--scope local) or over the whole model (--scope global); --pattern 2:4
  wanda      |w| x the L2 norm of its input feature (Sun et al. 2023), per output row
  magnitude and wanda prune in one shot, or with --schedule gradual while healing (Zhu &
  Gupta's cubic schedule over the first 3/4 of --heal-steps; needs --heal full|distill)

--amount is a fraction of that unit (0.5 = half of the heads); a list (0.2,0.4,0.6) makes a
sweep, each amount pruned from the original. Structured results are smaller ordinary model
folders (config + safetensors; per-layer shapes in deltatune_pruned.json when they differ);
unstructured ones are saved sparse (bitmask + non-zero values), so the bytes really shrink.
Both load with `deltatune eval/generate/train --model FOLDER`.

--heal fine-tunes each pruned model for --heal-steps on the training data: lora (LoRA on all
linear layers, merged afterwards; structured kinds only), full, or distill (full fine-tuning
plus word-level KD from the unpruned model). Unstructured zeros stay zero while healing.

The run directory (--out) holds config.json, metrics.jsonl (one line per stage),
summary.json (metric, parameters, latency per batch and bytes for the unpruned model and
every amount, pruned and healed), curve.png (metric vs amount), and amount-A/ with the
pruned/ and healed/ model folders and the heal/ training run."""

_PRUNE_EPILOG = """\
examples:
  deltatune prune runs/minilm-sst2 --kind heads --amount 0.2,0.4,0.6 --heal full \\
      --heal-steps 100 --out runs/minilm-sst2-heads
  deltatune prune smollm2-135m --task text --train ../shared/data/text/wikitext2_valid.txt \\
      --eval ../shared/data/text/wikitext2_test.txt --kind wanda --amount 0.5 --out runs/w50
  deltatune prune smollm2-135m --task text --train wiki_valid.txt --eval wiki_test.txt \\
      --kind layers --amount 0.25 --heal lora --heal-steps 200 --out runs/short"""

_DISTILL_DESCRIPTION = """\
Distil a teacher (a model, or a trained run with its adapter merged) into a student.

--kind (Kim & Rush 2016):
  none       the student on the data's labels only (the baseline to compare against)
  word       cross-entropy plus --kd-weight x T^2 KL(teacher_T || student_T) at every target
             position (logit KD for classifiers); --top-k K caches the teacher's top-K
             probabilities once in teacher_cache/ and frees the teacher before training
  seq        the teacher's beam-search output (--beams) replaces each training response
  seq-inter  of the teacher's beam candidates, the one closest to the reference
             (--interpolation-metric bleu | token_f1)
Teacher generations are cached in teacher_generations/ (kept by --overwrite), so a rerun does
not generate again.

The student: --student MODEL_OR_FOLDER (any model sharing the teacher's tokenizer for word
KD; a folder `deltatune prune` wrote works too), or --student-layers K: the teacher cut to K
layers (those of highest block influence kept): prune, then distill. It trains as an ordinary
run in student/ (--method, full by default); model/ holds the distilled model, read back and
made to generate; summary.json has teacher and student metrics, parameters and latency;
curve.png the student's training loss and its terms."""

_DISTILL_EPILOG = """\
examples:
  deltatune distill --teacher runs/minilm-sst2 --student-layers 3 --kind word \\
      --max-steps 300 --out runs/kd3
  deltatune distill --teacher runs/dates-lora --student-layers 22 --kind seq-inter \\
      --beams 4 --method lora --max-steps 200 --out runs/seqinter"""


def _amounts(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.5 or 0.2,0.4, got "
                                         f"{text!r}") from None


def _common_flags(p: argparse.ArgumentParser) -> None:
    from deltatune.cli_common import add_data_arguments
    p.add_argument("--task", choices=["causal-lm", "classification", "text"],
                   help="the model's task when the source is a model (a run knows its own); "
                   "text: plain language modelling, perplexity")
    add_data_arguments(p.add_argument_group(
        "data (default: the run's own; a model needs --train)"))
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--metric", choices=["auto", "exact_match", "perplexity", "accuracy"])
    g.add_argument("--eval-batch-size", type=int, default=32,
                   help="evaluation batch; also the batch whose forward latency is measured")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory to create")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code the model folder ships (auto_map); only for code you "
                   "have read")


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    from deltatune.jobs.prune import HEAL_MODES, pruner_names
    p = sub.add_parser("prune", help="prune heads, neurons, layers or weights; heal; measure",
                       description=_PRUNE_DESCRIPTION, epilog=_PRUNE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE",
                   help="a run directory (`deltatune train`), a known model name or a folder")
    g = p.add_argument_group("what to prune")
    g.add_argument("--kind", required=True, choices=pruner_names())
    g.add_argument("--amount", required=True, type=_amounts,
                   help="fraction(s) of the unit to remove: 0.5, or a sweep 0.2,0.4,0.6")
    g.add_argument("--scope", choices=["local", "global", "per-layer"],
                   help="magnitude: local (per layer, default) or global; neurons: per-layer "
                   "(default) or global")
    g.add_argument("--pattern", metavar="N:M", help="magnitude/wanda: semi-structured N:M "
                   "(2:4 keeps the 2 largest of every 4 consecutive inputs)")
    g.add_argument("--schedule", choices=["one-shot", "gradual"],
                   help="magnitude/wanda: one-shot (default), or gradual: pruned while healing "
                   "on Zhu & Gupta's cubic schedule (needs --heal full|distill)")
    g.add_argument("--gqa", choices=["query-heads", "kv-groups"],
                   help="heads on grouped-query attention (default query-heads)")
    g.add_argument("--iterations", type=int,
                   help="heads: prune in this many rounds, re-scoring in between (default 1)")
    g.add_argument("--importance", choices=["gradient", "activation", "block-influence",
                                            "loss"],
                   help="neurons: gradient (default) | activation; layers: block-influence "
                   "(default) | loss")
    g.add_argument("--calibration-examples", type=int, default=128,
                   help="training examples used to score (default 128)")
    g = p.add_argument_group("healing")
    g.add_argument("--heal", choices=HEAL_MODES, default="none")
    g.add_argument("--heal-steps", type=int, default=100)
    g.add_argument("--heal-lr", type=float, help="default 2e-4 (lora) or 5e-5 (full, distill)")
    g.add_argument("--heal-batch-size", type=int, default=16)
    g.add_argument("--heal-rank", type=int, default=16, help="LoRA rank for --heal lora")
    g.add_argument("--temperature", type=float, default=2.0, help="--heal distill temperature")
    g.add_argument("--kd-weight", type=float, default=1.0, help="--heal distill KD weight")
    _common_flags(p)
    p.set_defaults(handler=cmd_prune)


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    from deltatune.jobs.distill import KINDS
    p = sub.add_parser("distill", help="train a student from a teacher: word-level or "
                       "sequence-level KD", description=_DISTILL_DESCRIPTION,
                       epilog=_DISTILL_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True,
                   help="a run directory, a known model name or a folder")
    g.add_argument("--student", help="student model name or folder")
    g.add_argument("--student-layers", type=int, metavar="K",
                   help="instead of --student: the teacher cut to K layers")
    g.add_argument("--kind", choices=KINDS, default="word")
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--kd-weight", type=float, default=1.0,
                   help="word KD: loss = ce + weight x kd (default 1)")
    g.add_argument("--top-k", type=int, default=0,
                   help="word KD: cache the teacher's top-K probabilities (0: teacher online)")
    g.add_argument("--beams", type=int, default=4, help="seq KD: beam width")
    g.add_argument("--gen-tokens", type=int, default=64,
                   help="seq KD: most new tokens per teacher output")
    g.add_argument("--interpolation-metric", choices=["bleu", "token_f1"], default="bleu")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="keep teacher_cache/ and teacher_generations/ here instead of in --out, "
                   "so several runs with the same teacher share them")
    g = p.add_argument_group("student training")
    g.add_argument("--method", default="full", help="adaptation method (default full)")
    g.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--no-packing", action="store_true")
    g.add_argument("--calibration-examples", type=int, default=128,
                   help="--student-layers: examples that score the layers")
    _common_flags(p)
    p.set_defaults(handler=cmd_distill)


def _data_config(args: argparse.Namespace, source: str):
    """The data flags over the source run's data section (or alone, for a model)."""
    from deltatune.cli_common import data_section_from_args
    from deltatune.jobs.sources import is_run_directory
    from deltatune.spec import parse_run_spec, read_run_spec
    flags = data_section_from_args(args)
    if not flags:
        return None
    base: dict[str, Any] = {}
    if is_run_directory(source):
        base = dataclasses.asdict(read_run_spec(source).data)
        if "train" in flags or "builtin" in flags:
            base.pop("train", None), base.pop("builtin", None)
    return parse_run_spec({"data": {**base, **flags}}).data


def _eval_config(args: argparse.Namespace):
    from deltatune.eval.config import EvalConfig
    return EvalConfig(batch_size=args.eval_batch_size, metric=args.metric or "auto")


def cmd_prune(args: argparse.Namespace) -> int:
    from deltatune.jobs.prune import HealSettings, PruneRequest, prune_saved
    options = {key: value for key, value in (
        ("scope", args.scope), ("pattern", args.pattern), ("schedule", args.schedule),
        ("gqa", args.gqa),
        ("iterations", args.iterations), ("by", args.importance)) if value is not None}
    heal = HealSettings(mode=args.heal, steps=args.heal_steps, learning_rate=args.heal_lr,
                        batch_size=args.heal_batch_size, lora_rank=args.heal_rank,
                        temperature=args.temperature, kd_weight=args.kd_weight)
    request = PruneRequest(source=args.source, kind=args.kind, amounts=args.amount,
                           out=args.out, task=args.task, data=_data_config(args, args.source),
                           options=options, calibration_examples=args.calibration_examples,
                           heal=heal, eval=_eval_config(args), seed=args.seed,
                           overwrite=args.overwrite, progress=not args.no_progress,
                           trust_remote_code=args.trust_remote_code)
    _print(prune_saved(request))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from deltatune.cli_common import _key_values
    from deltatune.jobs.distill import DistillRequest, distill_saved
    from deltatune.spec import parse_run_spec
    train = parse_run_spec({"train": {"learning_rate": args.lr, "max_steps": args.max_steps,
                                      "epochs": args.epochs, "batch_size": args.batch_size,
                                      "packing": not args.no_packing}}).train
    if args.student is not None and Path(args.student).resolve() == Path(args.out).resolve():
        raise ConfigError("--out must differ from the --student folder")
    request = DistillRequest(
        teacher=args.teacher, out=args.out, kind=args.kind, student=args.student,
        student_layers=args.student_layers, task=args.task,
        data=_data_config(args, args.teacher), method=args.method,
        method_options=_key_values(args.option, "--option"), train=train,
        eval=_eval_config(args), temperature=args.temperature, kd_weight=args.kd_weight,
        top_k=args.top_k, beams=args.beams, max_new_tokens=args.gen_tokens,
        interpolation_metric=args.interpolation_metric,
        calibration_examples=args.calibration_examples, cache_dir=args.cache_dir,
        seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress,
        trust_remote_code=args.trust_remote_code)
    _print(distill_saved(request))
    return 0


def _print(summary: dict[str, Any]) -> None:
    from deltatune.jobs.inference import finite_or_null
    print(json.dumps(finite_or_null(summary), indent=2, default=str, allow_nan=False))


__all__ = ["add_distill_parser", "add_prune_parser", "cmd_distill", "cmd_prune"]
