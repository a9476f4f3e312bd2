"""The `deltatune` command: train, eval, generate, quantize, export, prune, distill, sequential,
interpolate, models.

Every subcommand has its own --help. User mistakes print one line `error: ...` with the fix and
exit with code 2; nothing is left half-written (see deltatune.fileio). This module only turns
arguments into the library's specs and requests (deltatune.spec, deltatune.jobs); nothing in the
library imports it."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from deltatune.cli_common import (_TRAIN_FLAGS, _key_values, add_data_arguments,
                                  add_forgetting_arguments, add_tracking_argument,
                                  forgetting_section_from_args)
from deltatune.errors import ConfigError, DeltatuneError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130



def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config section '{part}' must be a mapping (key: value lines), "
                              f"got {type(target).__name__}")
    target[leaf] = value


def _read_yaml(path: str | None) -> dict[str, Any]:
    from deltatune.spec import read_config_mapping
    return read_config_mapping(path) if path else {}


# `deltatune train` with no data and no config: the quickstart (LoRA on SmolLM2 learning the
# built-in dates task). These settings make it learn the task in a few minutes on 2 CPU cores;
# any flag the user gives still wins.
QUICKSTART_PRESET: dict[str, Any] = {
    "method_options": {"r": 16, "alpha": 32, "targets": ["all-linear"]},
    "train": {"learning_rate": 1e-3, "warmup_ratio": 0.05},
    "data": {"builtin": "dates", "builtin_train_size": 400, "builtin_eval_size": 100},
    # An ISO date and the end-of-turn token are 7 tokens; the base model rambles to the limit.
    "eval": {"max_new_tokens": 16},
}


def _is_quickstart(args: argparse.Namespace) -> bool:
    return not (args.config or args.train or args.builtin or args.model or args.method
                or args.task)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) \
            and isinstance(merged.get(key), dict) else value
    return merged


def build_train_spec(args: argparse.Namespace):
    from deltatune.spec import parse_run_spec

    raw = _deep_merge(QUICKSTART_PRESET, {}) if _is_quickstart(args) else {}
    raw = _deep_merge(raw, _read_yaml(args.config))
    for flag, dotted in _TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set_dotted(raw, dotted, value)
    options = _key_values(args.option, "--option")
    if options:
        raw["method_options"] = {**raw.get("method_options", {}), **options}
    for flag, dotted in (("column", "data.columns"), ("eval_column", "data.eval_columns"),
                         ("placeholder", "data.placeholders")):
        pairs = _key_values(getattr(args, flag), f"--{flag}")
        if pairs:
            _set_dotted(raw, dotted, {**(raw.get("data", {}).get(dotted.split(".")[1]) or {}),
                                      **{k: str(v) for k, v in pairs.items()}})
    if args.label_names:
        _set_dotted(raw, "data.label_names", [n.strip() for n in args.label_names.split(",")])
    if args.no_header:
        _set_dotted(raw, "data.header", False)
    if args.no_packing:
        _set_dotted(raw, "train.packing", False)
    if args.no_baseline:
        _set_dotted(raw, "eval.baseline", False)
    if args.lower_is_better:
        _set_dotted(raw, "train.greater_is_better", False)
    for dotted, value in forgetting_section_from_args(args).items():
        _set_dotted(raw, dotted, value)
    if args.no_progress:
        raw["progress"] = False
    return parse_run_spec(raw)


# -- subcommands -------------------------------------------------------------------------------

def build_resume_spec(args: argparse.Namespace):
    """The spec a run directory was started with; only --no-progress may change on resume."""
    from deltatune.spec import read_run_spec

    spec = read_run_spec(args.resume)
    return spec.model_copy(update={"output_dir": str(args.resume),
                                   "progress": spec.progress and not args.no_progress})


def launch_processes(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`deltatune train --nproc N ...` runs `torchrun --nproc_per_node=N -m deltatune train ...`."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    rest = _without_flag(list(argv), "--nproc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "deltatune", *rest]
    environment = dict(os.environ)
    # Each process gets its share of the cores, not all of them each.
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return subprocess.call(command, env=environment)


def _without_flag(argv: list[str], flag: str) -> list[str]:
    result, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            result.append(item)
    return result


def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.jobs import run_training
    from deltatune.train.loop import TrainingInterrupted

    if args.nproc is not None and os.environ.get("WORLD_SIZE") is None:
        return launch_processes(args, args.argv)
    spec = build_resume_spec(args) if args.resume else build_train_spec(args)
    try:
        summary = run_training(spec, resume=bool(args.resume), overwrite=args.overwrite,
                               trust_remote_code=args.trust_remote_code)
    except TrainingInterrupted as interrupted:
        run = spec.output_dir or "RUN_DIR"
        hint = f"; continue with: deltatune train --resume {run}" if interrupted.checkpoint \
            else "; no checkpoint was written"
        print(f"stopped: {interrupted}{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("baseline_metrics", "final_metrics",
                                                  "trainable_parameters", "trainable_percent",
                                                  "train_tokens_per_second", "adapter_bytes")},
                         indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from deltatune.fileio import write_json
    from deltatune.jobs import EvalRequest, evaluate_saved

    columns = {k: str(v) for k, v in _key_values(args.column, "--column").items()}
    if args.output:
        _check_output_file(args.output, "--output")
    request = EvalRequest(model=args.model, run=args.run, adapter=args.adapter, data=args.data,
                          task=args.task, columns=columns,
                          header=False if args.no_header else None, template=args.template,
                          metric=args.metric, max_length=args.max_length, limit=args.limit,
                          batch_size=args.batch_size, progress=not args.no_progress,
                          trust_remote_code=args.trust_remote_code)
    metrics = evaluate_saved(request)  # non-finite values are already null
    print(json.dumps(metrics, indent=2, default=str, allow_nan=False))
    if args.output:
        write_json(args.output, metrics)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from deltatune.jobs import GenerateRequest, generate_text

    request = GenerateRequest(prompt=args.prompt, model=args.model, run=args.run,
                              adapter=args.adapter, system=args.system,
                              template="none" if args.no_chat else args.template,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed, trust_remote_code=args.trust_remote_code)
    print(generate_text(request))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from deltatune.jobs.quantize import QuantizeRequest, quantize_saved

    request = QuantizeRequest(source=args.source, quant_format=args.format, out=args.out,
                              overwrite=args.overwrite, eval_text=args.eval_text,
                              eval_tokens=args.eval_tokens,
                              generate_tokens=args.generate_tokens, evaluate=not args.no_eval,
                              progress=not args.no_progress,
                              trust_remote_code=args.trust_remote_code)
    report = quantize_saved(request)
    print(json.dumps(report, indent=2, default=str, allow_nan=False))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from deltatune.models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'name':<14} {'kind':<10} {'params':>8}  {'offline':<8} {'size':>9}  hub id")
    for row in rows:
        size = f"{row.get('size_bytes', 0) / 1e6:.1f} MB" if row.get("size_bytes") else "-"
        print(f"{row['name']:<14} {row['kind']:<10} {row['params'] / 1e6:>7.1f}M  "
              f"{'yes' if row['available_offline'] else 'no':<8} {size:>9}  {row['hub_id']}")
    return 0


def _check_output_file(path: str, flag: str) -> None:
    """Fails before the work, not after it, when the result file cannot be written there."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path such as "
                          f"{target / 'metrics.json'}")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder; choose another "
                              f"{flag} path")


# -- argument parsing --------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code that the model, tokenizer or adapter folder ships "
                        "(auto_map in its config); off by default: only for code you have read")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one: train flags default to None because the
    value then comes from --config or the run spec's defaults."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model with a method and write a run directory",
        description="Fine-tune a model with an adaptation method. With no arguments: LoRA on "
        "the packaged SmolLM2-135M-Instruct, learning the built-in 'dates' task (normalise "
        "dates to ISO 8601), with exact match before and after (quickstart preset: LoRA r=16 "
        "on all linear layers, lr 1e-3, 400 generated examples). Flags override --config.",
        formatter_class=_HelpFormatter)
    p.add_argument("--config", help="YAML run config (see examples/); flags override it")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="known name (see `deltatune models`), local folder or hub id")
    g.add_argument("--task", choices=["causal-lm", "classification", "text"],
                   help="causal-lm: instruction tuning; text: plain LM adaptation")
    g.add_argument("--method", help="adaptation method: lora, qlora, full, freeze, adapter, "
                   "prefix, prompt, ptuning, ia3, textual-inversion, hyperlora")
    g.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable: -o r=16 -o targets=q_proj,v_proj")
    g.add_argument("--quantize", metavar="FORMAT",
                   help="freeze the base's linear layers in a number format while loading: "
                   "nf4 (QLoRA: NF4 + double quantization; `--method qlora` implies it), int8, "
                   "int4-g128, int4-g128-asym, int2-g64, int1-g64, ternary")
    g.add_argument("--base-dtype", choices=["auto", "fp32", "bf16"],
                   help="precision of the frozen base (default fp32); auto = bf16 only where "
                   "the CPU has native bf16 and a measured matmul is faster; trainable weights "
                   "and optimizer state stay fp32")
    add_data_arguments(p.add_argument_group("data"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, help="examples (or packed rows) per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    g.add_argument("--optimizer", choices=["adamw", "paged_adamw_8bit"],
                   help="adamw (default) or bitsandbytes' paged 8-bit AdamW (QLoRA's; CUDA "
                   "only)")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"])
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--no-packing", action="store_true",
                   help="pad each batch instead of packing several examples per row")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each layer in backward: less memory, ~30%% more time")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model's layers (slow first steps; see docs/speed.md)")
    g.add_argument("--allocator", choices=["reuse", "release", "system"],
                   help="CPU memory policy: reuse (default, fastest), release (lowest RSS), "
                        "system (glibc's default)")
    g.add_argument("--threads", type=int,
                   help="torch threads (default: one per core that other processes leave "
                        "free, re-checked every 5 s)")
    g = p.add_argument_group("checkpoints and processes")
    g.add_argument("--save-every", type=int,
                   help="write a resumable checkpoint every N optimizer steps (Ctrl-C always "
                        "writes one)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its newest checkpoint, with the "
                        "settings it was started with")
    g.add_argument("--nproc", type=int,
                   help="train on N processes (runs torchrun; same as `torchrun "
                        "--nproc_per_node=N -m deltatune train ...`)")
    g.add_argument("--distributed", choices=["ddp", "fsdp"],
                   help="with several processes: ddp replicates the model (default), fsdp "
                        "shards it (FSDP2)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, help="evaluate every N optimizer steps")
    g.add_argument("--early-stopping-patience", type=int,
                   help="stop after N evaluations without improvement (needs --eval-every)")
    g.add_argument("--metric-for-best", help="eval metric early stopping watches (any "
                   "logged eval metric: accuracy, loss, retain_c4_perplexity, combined, ...)")
    g.add_argument("--lower-is-better", action="store_true",
                   help="--metric-for-best improves downwards (loss, perplexity, combined)")
    g.add_argument("--metric", choices=["auto", "exact_match", "perplexity", "accuracy"])
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--max-new-tokens", type=int, help="generation length for exact match")
    g.add_argument("--no-baseline", action="store_true", help="skip evaluating before training")
    g.add_argument("--log-every", type=int, help="write metrics.jsonl every N steps")
    g.add_argument("--stop-on-divergence", action="store_true", default=None,
                   help="stop with an error (instead of a warning) when the smoothed loss "
                        "climbs past 4x the first step's")
    g.add_argument("--seed", type=int, help="drives data order, initialisation and dropout")
    g.add_argument("--output-dir", help="run directory (default runs/<time>-<model>-<method>); "
                   "must not hold another run unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (to continue it instead, use "
                        "--resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_tracking_argument(g)
    _add_trust_flag(g)
    add_forgetting_arguments(p)
    p.set_defaults(handler=cmd_train)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a base model or a trained run on a dataset",
        description="Evaluate a base model (--model) or a run directory (--run, loads its "
        "adapter) on a dataset. Without --data, a run is evaluated on its own eval split.")
    p.add_argument("--model", help="base model name, folder or hub id")
    p.add_argument("--run", help="run directory written by `deltatune train`")
    p.add_argument("--adapter", help="adapter folder (adapter_config.json + safetensors)")
    p.add_argument("--data", help="evaluation file; default: the run's evaluation data")
    p.add_argument("--task", choices=["causal-lm", "classification", "text"])
    p.add_argument("--column", action="append", metavar="OURS=THEIRS")
    p.add_argument("--no-header", action="store_true",
                   help="the .csv/.tsv file has no header row; name columns by position: "
                   "--column label=0 --column text=1")
    p.add_argument("--template", choices=["alpaca", "chat", "none"])
    p.add_argument("--metric", choices=["auto", "exact_match", "perplexity", "accuracy"])
    p.add_argument("--max-length", type=_positive_int)
    p.add_argument("--limit", type=_positive_int, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--output", help="also write the metrics to this JSON file (written as "
                   "given: any path you can write to)")
    p.add_argument("--no-progress", action="store_true")
    _add_trust_flag(p)
    p.set_defaults(handler=cmd_eval)


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a base model plus an optional adapter",
        description="Generate a reply to a prompt. With a chat model the prompt is wrapped in "
        "the tokenizer's chat template (disable with --no-chat).")
    p.add_argument("prompt", help="the user message or raw prompt")
    p.add_argument("--model", help="base model (default: the run's model, else smollm2-135m)")
    p.add_argument("--run", help="run directory (its adapter is loaded)")
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--template", choices=["chat", "alpaca", "none"],
                   help="prompt format (default: chat when the tokenizer has a chat template)")
    p.add_argument("--no-chat", action="store_true", help="same as --template none")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    _add_trust_flag(p)
    p.set_defaults(handler=cmd_generate)


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="freeze a model's linear layers in a low-bit format and measure it",
        description="Quantize the linear layers of a model (or of a trained run, its adapter "
        "merged first) and write the packed model to --out, which `deltatune eval`, `generate` "
        "and `train --model DIR` load. Reports bytes on disk against fp32, WikiText-2 "
        "perplexity before and after (accuracy for a classification run), the weight "
        "reconstruction error and milliseconds per generated token; the report is also "
        f"written to DIR/quantize_report.json.", formatter_class=_HelpFormatter)
    p.add_argument("source", metavar="MODEL_OR_RUN",
                   help="known model name, folder, hub id, or a run directory")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="nf4 (NF4 + double quantization, as QLoRA), int8 (per channel), "
                   "int4-g128 / int4-g128-asym (groups of 128), int2-g64, int1-g64 (sign and "
                   "group scale), ternary (BitNet b1.58); any group size: int4-g32, ...")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the packed model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--eval-text", metavar="FILE",
                   help="plain text for perplexity (default: ../shared/data/text/"
                   "wikitext2_test.txt)")
    p.add_argument("--eval-tokens", type=_positive_int, default=8192,
                   help="tokens of --eval-text to score, in windows of 512")
    p.add_argument("--generate-tokens", type=int, default=32,
                   help="tokens to generate for the ms/token measurement (0: skip)")
    p.add_argument("--no-eval", action="store_true", help="skip the quality measurement")
    p.add_argument("--no-progress", action="store_true")
    _add_trust_flag(p)
    p.set_defaults(handler=cmd_quantize)


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list known models and whether they are available offline",
                       description="List the models deltatune knows by name, whether each is "
                       "available offline on this machine, its size and its hub id.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    from deltatune.cli_compress import add_distill_parser, add_prune_parser
    from deltatune.cli_export import add_export_parser
    from deltatune.cli_forgetting import add_interpolate_parser
    from deltatune.cli_sequential import add_sequential_parser
    from deltatune.cli_adapters import add_merge_adapters_parser
    from deltatune.cli_analyze import add_analyze_parser
    from deltatune.cli_serve import add_serve_parser
    from deltatune.cli_compare import add_compare_parser
    from deltatune.cli_plan import add_plan_parser

    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Fine-tune pre-trained models with the right method and measure every "
        "choice: quality, trainable parameters, memory, time, bytes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_quantize_parser(sub)
    add_export_parser(sub)
    add_prune_parser(sub)
    add_distill_parser(sub)
    add_sequential_parser(sub)
    add_interpolate_parser(sub)
    add_serve_parser(sub)
    add_merge_adapters_parser(sub)
    add_analyze_parser(sub)
    add_compare_parser(sub)
    add_plan_parser(sub)
    _add_models_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except DeltatuneError as error:
        # One line even when the message quotes data with line breaks in it.
        print("error: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
