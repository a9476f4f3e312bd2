"""What the command-line modules share: the `train` flags' places in a RunSpec, KEY=VALUE
parsing, and the data flags `train`, `prune` and `distill` all take. cli.py and the subcommand
modules (cli_compress.py) import it; nothing imports cli.py itself."""
from __future__ import annotations

import argparse
from typing import Any, Sequence

import yaml

from deltatune.errors import ConfigError

# flag destination -> dotted path inside RunSpec; flags override the YAML file.
_TRAIN_FLAGS: dict[str, str] = {
    "model": "model", "task": "task", "method": "method", "seed": "seed",
    "output_dir": "output_dir",
    "train": "data.train", "eval": "data.eval", "builtin": "data.builtin",
    "builtin_train_size": "data.builtin_train_size", "builtin_eval_size": "data.builtin_eval_size",
    "template": "data.template", "max_length": "data.max_length",
    "eval_fraction": "data.eval_fraction", "train_limit": "data.train_limit",
    "eval_limit": "data.eval_limit",
    "lr": "train.learning_rate", "weight_decay": "train.weight_decay",
    "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size",
    "grad_accum": "train.gradient_accumulation", "grad_clip": "train.grad_clip",
    "optimizer": "train.optimizer",
    "schedule": "train.schedule", "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps", "eval_every": "train.eval_every",
    "log_every": "train.log_every", "early_stopping_patience": "train.early_stopping_patience",
    "metric_for_best": "train.metric_for_best",
    "eval_batch_size": "eval.batch_size", "max_new_tokens": "eval.max_new_tokens",
    "metric": "eval.metric",
    "activation_checkpointing": "train.activation_checkpointing", "compile": "train.compile",
    "allocator": "train.allocator", "threads": "train.threads",
    "save_every": "train.save_every", "distributed": "train.distributed",
    "stop_on_divergence": "train.stop_on_divergence", "report_to": "train.report_to",
    "quantize": "quantize", "base_dtype": "base_dtype",
    "probe": "eval.probe", "init_from": "init_from",
    "kl_weight": "forgetting.kl_weight", "kl_temperature": "forgetting.kl_temperature",
    "replay_fraction": "forgetting.replay_fraction", "ewc_weight": "forgetting.ewc_weight",
    "ewc_batches": "forgetting.ewc_batches", "l2sp_weight": "forgetting.l2sp_weight",
    "retention_weight": "forgetting.retention_weight",
}


def parse_retain_flag(value: str) -> dict[str, str]:
    """`--retain-eval NAME=PATH` or `--retain-eval PATH` as a RetainSet mapping. Text before
    '=' is a name only when it looks like one (no '/' or '.'), so a path holding '=' reads."""
    name, sep, path = value.partition("=")
    if sep and name and "/" not in name and "." not in name:
        if not path:
            raise ConfigError(f"--retain-eval {value}: give a file after '=', e.g. "
                              "c4=../shared/data/text/c4_demo.jsonl")
        return {"path": path, "name": name}
    if not value:
        raise ConfigError("--retain-eval needs a file: --retain-eval [NAME=]PATH")
    return {"path": value}


def add_forgetting_arguments(parser: argparse.ArgumentParser) -> None:
    """`train`'s flags for measuring and fighting forgetting (docs/forgetting.md)."""
    g = parser.add_argument_group(
        "forgetting", "measured before training and at every evaluation; mitigations combine")
    g.add_argument("--retain-eval", action="append", metavar="[NAME=]PATH",
                   help="data the model should keep, repeatable: general text for a language "
                   "model (perplexity; e.g. ../shared/data/text/c4_demo.jsonl), an earlier "
                   "task's labelled file for a classifier (accuracy among its own classes)")
    g.add_argument("--probe", choices=["auto", "on", "off"],
                   help="the default forgetting probe: KL from the base model on continuations "
                   "it sampled itself from neutral prompts (auto: on for language models)")
    g.add_argument("--kl-weight", type=float,
                   help="KL to the original model's next-token distributions on the training "
                   "batch, times this weight (adapters: the same model with the adapter off; "
                   "full fine-tuning: a frozen copy)")
    g.add_argument("--kl-temperature", type=float, help="softening temperature of the KL")
    g.add_argument("--replay", metavar="PATH",
                   help="mix examples of this file (general text or an earlier task) into "
                   "every batch")
    g.add_argument("--replay-fraction", type=float,
                   help="share of every batch taken from --replay (default 0.25)")
    g.add_argument("--ewc-weight", type=float,
                   help="EWC: Fisher-weighted squared distance from the starting weights")
    g.add_argument("--ewc-data", metavar="PATH",
                   help="data to estimate the Fisher on (default: --replay, else the first "
                   "--retain-eval)")
    g.add_argument("--ewc-batches", type=int, help="batches of 4 for the Fisher estimate")
    g.add_argument("--l2sp-weight", type=float,
                   help="L2-SP: squared distance from the starting weights (adapters: of the "
                   "effective weight delta)")
    g.add_argument("--retention-weight", type=float,
                   help="weight of the retention rise in the `combined` eval metric (task loss "
                   "+ weight x rise of the retain losses and probe KL; for --metric-for-best "
                   "combined --lower-is-better)")
    g.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from a finished run's weights (sequential fine-tuning; a "
                   "classifier's head keeps that run's classes and adds the new ones)")


def add_tracking_argument(group: argparse._ArgumentGroup) -> None:
    """`--report-to`: experiment trackers for a training run (docs/tracking.md)."""
    group.add_argument("--report-to", metavar="TRACKERS",
                       help="send metrics.jsonl's numbers to experiment trackers: tensorboard "
                       "(event files in RUN_DIR/tensorboard/; view with `tensorboard --logdir "
                       "RUN_DIR`; needs `pip install tensorboard`) or none (default); several "
                       "comma-separated")


def forgetting_section_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The list- and file-valued forgetting flags as spec entries: {dotted path: value}."""
    entries: dict[str, Any] = {}
    if getattr(args, "retain_eval", None):
        entries["eval.retain"] = [parse_retain_flag(v) for v in args.retain_eval]
    if getattr(args, "replay", None):
        entries["forgetting.replay"] = {"path": args.replay}
    if getattr(args, "ewc_data", None):
        entries["forgetting.ewc_data"] = {"path": args.ewc_data}
    return entries


def _key_values(pairs: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """Parses KEY=VALUE pairs; values are read as YAML (numbers, booleans, lists)."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got '{pair}'")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            raise ConfigError(f"{flag} {key}: the value {value!r} is not valid YAML; quote "
                              f"it whole, e.g. {key}='\"text\"'") from None
        if isinstance(parsed, str) and "," in parsed and not value.startswith(("'", '"')):
            parsed = [part.strip() for part in parsed.split(",") if part.strip()]
        result[key.strip()] = parsed
    return result



def add_data_arguments(g: argparse._ArgumentGroup) -> None:
    """The data flags `train` has; `prune` and `distill` take the same ones."""
    g.add_argument("--train", help="training file (.json/.jsonl/.csv/.tsv/.txt) or hf:NAME")
    g.add_argument("--eval", help="evaluation file; without it a split of --train is used")
    g.add_argument("--builtin", help="built-in generated task (e.g. dates)")
    g.add_argument("--builtin-train-size", type=int)
    g.add_argument("--builtin-eval-size", type=int)
    g.add_argument("--column", action="append", metavar="OURS=THEIRS",
                   help="map a column, e.g. --column text=sentence --column label=label")
    g.add_argument("--eval-column", action="append", metavar="OURS=THEIRS",
                   help="map a column of the --eval file when it differs, e.g. text=content")
    g.add_argument("--no-header", action="store_true",
                   help="the .csv/.tsv files have no header row; name columns by position: "
                   "--column label=0 --column text=1")
    g.add_argument("--label-names", help="comma-separated class names, in label-id order")
    g.add_argument("--placeholder", action="append", metavar="KEY=VALUE",
                   help="fill {{KEY}} in the data, e.g. --placeholder name=Ada")
    g.add_argument("--template", choices=["alpaca", "chat", "none"])
    g.add_argument("--max-length", type=int, help="tokens per example (longer are truncated)")
    g.add_argument("--eval-fraction", type=float, help="held-out share when no --eval file")
    g.add_argument("--train-limit", type=int, help="use only the first N training rows")
    g.add_argument("--eval-limit", type=int, help="use only the first N evaluation rows")


def data_section_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `data:` section the data flags describe (only the flags that were given)."""
    raw: dict[str, Any] = {}
    for flag, dotted in _TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if dotted.startswith("data.") and value is not None:
            raw[dotted.split(".", 1)[1]] = value
    for flag, key in (("column", "columns"), ("eval_column", "eval_columns"),
                      ("placeholder", "placeholders")):
        pairs = _key_values(getattr(args, flag, None), f"--{flag.replace('_', '-')}")
        if pairs:
            raw[key] = {k: str(v) for k, v in pairs.items()}
    if getattr(args, "label_names", None):
        raw["label_names"] = [n.strip() for n in args.label_names.split(",")]
    if getattr(args, "no_header", False):
        raw["header"] = False
    return raw
