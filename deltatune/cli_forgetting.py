"""The `deltatune interpolate` subcommand (WiSE-FT weight interpolation of a finished run): its
flags and --help, turned into an `InterpolateRequest` (deltatune/jobs/interpolate.py), whose
summary it prints as JSON on stdout; stage lines and the progress bar go to stderr. Also the
`--retain-eval [NAME=]PATH` parser other commands share. `deltatune/cli.py` registers the
subcommand; user mistakes raise DeltatuneError subclasses, which `cli.main` prints as one
`error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from deltatune.data.retain import RetainSet
from deltatune.cli_common import parse_retain_flag as retain_flag_entry
from deltatune.errors import ConfigError

_INTERPOLATE_DESCRIPTION = """\
WiSE-FT (Wortsman et al. 2022): mix a fine-tuned run's weights with the original model's,
theta(alpha) = (1 - alpha) * theta_original + alpha * theta_tuned, and measure every alpha.
Somewhere between 0 (the original exactly) and 1 (the fine-tuned run) the task is often almost
as good while much less of what the original knew is forgotten.

Adapter methods (LoRA, QLoRA, IA3, bottleneck adapters, HyperLoRA) scale their delta; full
fine-tuning and freeze interpolate the weights themselves; prefix / prompt / P-tuning have no
weight delta and are refused. A new classification head stays as trained at every alpha.

Each alpha is measured on the run's eval split (its task metric), on every --retain-eval set
(default: the run's own retain sets) and, for language models, by the forgetting probe (KL from
the original model, whose reference is taken at alpha 0). alpha 0 is always measured.
Values outside [0, 1] extrapolate (a warning says so).

The output folder (--out, default RUN/interpolate) holds config.json, metrics.jsonl (one line per
alpha), summary.json (the table, the best alpha for the task, every alpha's task gain and
retention change over alpha 0), table.md and tradeoff.png. --alpha A --save DIR also writes the
model at that alpha as a plain model folder (`deltatune eval --model DIR`, transformers)."""

_INTERPOLATE_EPILOG = """\
examples:
  deltatune interpolate runs/dates-lora --alphas 0:1:0.1 \\
      --retain-eval c4=../shared/data/text/c4_demo.jsonl
  deltatune interpolate runs/minilm-sst2-full --alphas 0,0.5,0.8,1 --no-probe \\
      --alpha 0.8 --save runs/minilm-sst2-wise08"""


def parse_retain_flag(value: str) -> RetainSet:
    """`--retain-eval NAME=PATH` or `--retain-eval PATH` as a RetainSet (the rules are
    cli_common's, which `train` uses)."""
    return RetainSet(**retain_flag_entry(value))


def parse_alphas(text: str) -> list[float]:
    """`0,0.5,1` or `start:stop:step` (stop included when a step lands on it)."""
    if ":" in text:
        return _alpha_range(text)
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: expected numbers such as 0,0.5,1 or a range "
                          "start:stop:step such as 0:1:0.1") from None
    _require_finite(values, text)
    if not values:
        raise ConfigError("--alphas is empty; give e.g. 0,0.5,1")
    return values


def _alpha_range(text: str) -> list[float]:
    try:
        start, stop, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: a range is start:stop:step, e.g. 0:1:0.1") \
            from None
    _require_finite([start, stop, step], text)
    if step <= 0 or stop < start:
        raise ConfigError(f"--alphas {text!r}: the step must be positive and stop at least "
                          "start, e.g. 0:1:0.1")
    # The tolerance keeps the stop that rounding puts a hair beyond the last step (0:1:0.1).
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > 1000:
        raise ConfigError(f"--alphas {text!r} gives {count} values; use a larger step")
    return [round(start + index * step, 10) for index in range(count)]


def _require_finite(values: list[float], text: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--alphas {text!r}: every alpha must be a finite number")


def add_interpolate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("interpolate", help="WiSE-FT: interpolate a run towards the original "
                       "weights; task vs retention for each alpha",
                       description=_INTERPOLATE_DESCRIPTION, epilog=_INTERPOLATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a finished run directory (`deltatune train`)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                   help="alphas to measure: a list 0,0.5,1 or a range start:stop:step such as "
                   "0:1:0.1 (default 0,0.25,0.5,0.75,1); one that starts with a negative value "
                   "needs '=': --alphas=-0.5,0,1")
    p.add_argument("--retain-eval", action="append", metavar="[NAME=]PATH",
                   help="data the model should keep, repeatable (default: the run's own retain "
                   "sets): general text for a language model (perplexity), an earlier task's "
                   "labelled file for a classifier (accuracy)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the forgetting probe (KL from the original model)")
    p.add_argument("--eval-limit", type=int, metavar="N",
                   help="evaluate on the first N eval records only (rows, or lines of text)")
    p.add_argument("--eval-batch-size", type=int, metavar="B",
                   help="evaluation batch (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN/interpolate)")
    p.add_argument("--alpha", type=float, metavar="A",
                   help="with --save: the alpha of the model to write")
    p.add_argument("--save", metavar="DIR",
                   help="with --alpha: write the model at that alpha as a plain model folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out / --save folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code the model folder ships (auto_map); only for code you "
                   "have read")
    p.set_defaults(handler=cmd_interpolate)


def cmd_interpolate(args: argparse.Namespace) -> int:
    from deltatune.jobs.interpolate import InterpolateRequest, interpolate_run
    for flag, value in (("--eval-limit", args.eval_limit),
                        ("--eval-batch-size", args.eval_batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    request = InterpolateRequest(
        run=args.run, alphas=parse_alphas(args.alphas),
        retain=[parse_retain_flag(v) for v in args.retain_eval or []],
        probe=not args.no_probe, eval_limit=args.eval_limit, batch_size=args.eval_batch_size,
        out=args.out, save_alpha=args.alpha, save_to=args.save, overwrite=args.overwrite,
        progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    _print(interpolate_run(request))
    return 0


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, default=str, allow_nan=False))


__all__ = ["add_interpolate_parser", "cmd_interpolate", "parse_alphas", "parse_retain_flag"]
