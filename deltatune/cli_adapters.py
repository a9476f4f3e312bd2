"""The `deltatune merge-adapters` subcommand: its flags and --help, then
`deltatune.serve.arithmetic.merge_adapters`, which combines adapters into one new adapter folder.
`deltatune/cli.py` registers it; user mistakes raise DeltatuneError subclasses, which `cli.main`
prints as one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import json

from deltatune.errors import ConfigError

_DESCRIPTION = """\
Combine adapters trained on one base model into one new adapter folder (adapter_config.json +
adapter_model.safetensors, loadable by deltatune, PEFT and `deltatune serve`) and a merge.json
report. Adapters are given as folders or as `deltatune train` run directories.

methods:
  linear      Σ wᵢ·ΔWᵢ. For LoRA it is exact: the factors are stacked (rank = Σ rᵢ), no SVD.
  negate      −w·ΔW of one adapter: subtract a behaviour (task arithmetic's "forgetting by
              negation"); weights default to 1.
  ties        TIES-merging (Yadav et al., 2023): trim each task vector to its largest --density
              share of entries, elect a sign per entry (--majority-sign total|frequency), average
              the entries that agree with it.
  dare_linear DARE (Yu et al., 2024): drop entries at random with probability 1−density, rescale
              the rest by 1/density (seeded by --seed), then the weighted sum.
  dare_ties   DARE's drop and rescale, then TIES' sign election and disjoint mean.

TIES and DARE work on the dense ΔW of each layer; for LoRA the result is factored back by SVD
to --rank (default: the largest input rank), and merge.json says how much of each layer's energy
the rank kept. IA3 vectors are combined as task vectors (l − 1). Adapters of different methods,
of different base models, or with extra trained tensors (bias, modules_to_save, DoRA) are
refused with the reason."""

_EPILOG = """\
examples:
  deltatune merge-adapters runs/dates runs/numbers --out merged/both
  deltatune merge-adapters runs/dates runs/numbers --method ties --density 0.5 \\
      --weights 1,0.8 --rank 16 --out merged/ties
  deltatune merge-adapters runs/toxic --method negate --weights 0.5 --out merged/less-toxic
  deltatune serve --adapter both=merged/both"""


def add_merge_adapters_parser(sub: argparse._SubParsersAction) -> None:
    from deltatune.serve.arithmetic import MERGE_METHODS, SIGN_RULES

    p = sub.add_parser("merge-adapters", help="combine adapters into one (linear, TIES, DARE, "
                       "negation)", description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="adapter folders or `deltatune train` run directories")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the adapter folder to write (must be new or empty unless --overwrite)")
    p.add_argument("--method", choices=sorted(MERGE_METHODS), default="linear",
                   help="how to combine them (default linear)")
    p.add_argument("--weights", metavar="W1,W2,...",
                   help="one weight per adapter, comma-separated (default 1 each)")
    p.add_argument("--density", type=float, default=0.5,
                   help="ties/dare: the share of each task vector kept (default 0.5)")
    p.add_argument("--majority-sign", choices=list(SIGN_RULES), default="total",
                   help="ties: elect the sign by total mass or by count (default total)")
    p.add_argument("--seed", type=int, default=0, help="dare: the random drop's seed (default 0)")
    p.add_argument("--rank", type=int,
                   help="LoRA rank of a dense (ties/dare) merge (default: largest input rank)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_merge_adapters)


def cmd_merge_adapters(args: argparse.Namespace) -> int:
    from deltatune.serve.arithmetic import MergeOptions, MergeRequest, merge_adapters

    options = MergeOptions(density=args.density, majority_sign=args.majority_sign,
                           seed=args.seed, rank=args.rank)
    request = MergeRequest(adapters=list(args.adapters), out=args.out, method=args.method,
                           weights=_weights(args.weights), options=options,
                           overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(merge_adapters(request), indent=2))
    return 0


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights '{text}' is not a comma-separated list of numbers; "
                          "write e.g. --weights 1,0.5") from None
