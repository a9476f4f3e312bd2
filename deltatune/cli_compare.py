"""The `deltatune compare` and `deltatune report` subcommands: train several methods on the same
data and settings and report quality against cost (deltatune/jobs/compare.py), or build the same
report from run directories that already exist (deltatune/report/render.py).
`deltatune/cli.py` registers them; user mistakes raise DeltatuneError subclasses, which
`cli.main` prints as one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import json
import sys

from deltatune.errors import ConfigError

_COMPARE_DESCRIPTION = """\
Train several adaptation methods on the same data, seed and settings and compare them.

--config is the run config every variant shares (as for `deltatune train --config`: model,
task, data, train, eval, seed). Each variant replaces its method, method options and learning
rate. With --methods a,b,c every method is one variant: the base config's method_options and
train.learning_rate apply to the variant of the base's own method; the others use the method's
defaults and these learning rates:
  full 5e-5, freeze 1e-3, lora/qlora 1e-3, adapter 1e-3, hyperlora 1e-3, ia3 1e-2,
  prefix 1e-2, ptuning 1e-2, prompt 3e-2, textual-inversion 5e-3.
With --variants FILE each variant is spelled out (YAML list):
  - {name: lora-r8, method: lora, options: {r: 8, targets: [all-linear]}, learning_rate: 1e-3}
  - {name: full, method: full, learning_rate: 5e-5}

Layout: OUT/configs/NAME.yaml (the variant's run config: `deltatune train --config` reproduces
it), OUT/runs/NAME/ (its run directory), OUT/comparison.json, and the report: OUT/report.html
(one self-contained file), OUT/report.md with its PNG figures, OUT/report.json. Each variant
trains in its own `deltatune train` process, so its peak memory is its own.

Resumable: run the same command again and finished variants are reused, an interrupted one
continues from its newest checkpoint (set train.save_every in the base config to checkpoint
periodically; Ctrl-C always writes one) or starts over without one."""

_COMPARE_EPILOG = """\
examples:
  deltatune compare --config benchmarks/compare_minilm_sst2/base.yaml \\
      --methods full,lora,adapter,prefix --out runs/compare-sst2
  deltatune compare --config base.yaml --variants variants.yaml --out runs/cmp --memory 8GB
  deltatune report runs/compare-sst2 --out runs/compare-sst2   # re-render, e.g. --memory 1GB"""

_REPORT_DESCRIPTION = """\
Build the comparison report from finished run directories: a `deltatune compare --out` folder,
individual `deltatune train` run directories, or folders holding run directories. Writes
report.html (self-contained: figures embedded, no scripts, opens offline), report.md with its
PNG figures, and report.json into --out.

Contents: the table (metric, before-training metric, forgetting where retain sets were measured,
trainable parameters and %, peak memory, wall time, tokens/s, bytes on disk, Pareto-optimal),
training-loss curves, the metric against trainable parameters, peak memory and wall time with
the Pareto front marked, and the recommendation: the method-choice framework's pick for the
model size and memory budget next to what the measurements show (best metric, the cheapest
variants within --tolerance of it, the Pareto-optimal set)."""


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("report")
    g.add_argument("--memory", metavar="SIZE",
                   help="memory you have for training, e.g. 24GB (GB = GiB): a variant fits "
                   "when its measured peak is within it; without it everything fits")
    g.add_argument("--metric", help="final metric to compare (default: exact_match, accuracy, "
                   "perplexity or loss, the first every run has)")
    g.add_argument("--tolerance", type=float, default=1.0,
                   help="how close to the best metric counts as as good: percentage points "
                   "for accuracy-like metrics, percent of the best value otherwise")
    g.add_argument("--title", default="Method comparison", help="the report's heading")


def _report_options(args: argparse.Namespace):
    from deltatune.report.comparison import ReportOptions, parse_memory

    if args.tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0, got {args.tolerance}")
    return ReportOptions(metric=args.metric,
                         memory_budget_bytes=parse_memory(args.memory) if args.memory else None,
                         tolerance=args.tolerance, title=args.title)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several methods on the same data; report "
                       "quality vs parameters, memory and time", description=_COMPARE_DESCRIPTION,
                       epilog=_COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="BASE.yaml",
                   help="the run config every variant shares")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--methods", metavar="M1,M2,...",
                       help="methods to compare, e.g. full,lora,adapter,prefix")
    which.add_argument("--variants", metavar="VARIANTS.yaml",
                       help="YAML list of variants: name, method, options, learning_rate")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="comparison folder (configs/, runs/, report files)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain variants whose folders hold runs with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model's folder")
    _add_report_options(p)
    p.set_defaults(handler=cmd_compare)

    r = sub.add_parser("report", help="the comparison report from existing run directories",
                       description=_REPORT_DESCRIPTION, epilog=_COMPARE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("sources", nargs="+", metavar="RUN_OR_DIR",
                   help="run directories, comparison folders, or folders of runs")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    _add_report_options(r)
    r.set_defaults(handler=cmd_report)


def cmd_compare(args: argparse.Namespace) -> int:
    from deltatune.jobs.compare import (EXIT_INTERRUPTED, CompareRequest, ComparisonInterrupted,
                                        read_variants_file, run_comparison,
                                        variants_from_methods)

    variants = read_variants_file(args.variants) if args.variants else \
        variants_from_methods(args.methods)
    request = CompareRequest(config=args.config, variants=variants, out=args.out,
                             report=_report_options(args), overwrite=args.overwrite,
                             progress=not args.no_progress,
                             trust_remote_code=args.trust_remote_code)
    try:
        result = run_comparison(request)
    except ComparisonInterrupted as interrupted:
        print(f"stopped: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_result(result.report, {"trained": result.trained,
                                  "reused": [p.variant.name for p in result.variants
                                             if p.variant.name not in result.trained]})
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deltatune.report.render import build_report

    files = build_report(args.sources, args.out, _report_options(args))
    _print_result(files, {})
    return 0


def _print_result(files, extra: dict) -> None:
    comparison = files.comparison
    print(json.dumps({**extra, "metric": comparison.metric,
                      "rows": {r.name: r.metric for r in comparison.rows},
                      "pareto_optimal": [r.name for r in comparison.rows if r.pareto],
                      "recommendation": comparison.recommendation,
                      "report": {"html": str(files.html), "markdown": str(files.markdown),
                                 "json": str(files.json)}}, indent=2))
