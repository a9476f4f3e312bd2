"""The `deltatune analyze` subcommands: `spectrum` (the singular values of a run's ΔW per layer),
`extract-lora` (a full fine-tune's ΔW compressed into LoRA adapters by truncated SVD, each
evaluated) and `intrinsic-dimension` (a sweep of subspace trainings against full fine-tuning).
`deltatune/cli.py` registers them; user mistakes raise DeltatuneError subclasses, which
`cli.main` prints as one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import json

from deltatune.errors import ConfigError

_DESCRIPTION = """\
What fine-tuning changed, read from a finished run directory (any method whose change is a
weight delta: full, freeze, LoRA, IA3, ...), relative to the run's base model.

  spectrum      singular values of every changed linear layer's ΔW = W_tuned − W_base: the
                rank that keeps 50 / 90 / 99 % of its energy, per layer and per layer kind
                (spectrum.md, spectrum.json, spectrum.png).
  extract-lora  the best rank-r approximation of each ΔW (truncated SVD) written as a LoRA
                adapter in PEFT's format, for each --ranks r, each evaluated on the run's eval
                split next to the run itself (summary.json, extract.md, metric_vs_rank.png).
  intrinsic-dimension
                train a run config in random d-dimensional subspaces of the parameters
                (θ = θ₀ + P z, Fastfood projection, only z trains) for each --dimensions d, and
                once with full fine-tuning; d90 = the smallest d reaching 90 % of full
                fine-tuning's metric (summary.json, intrinsic.md, intrinsic.png). Resumable:
                finished runs under --out are not retrained."""

_EPILOG = """\
examples:
  deltatune analyze spectrum runs/sst2-full --out analysis/spectrum
  deltatune analyze extract-lora runs/sst2-full --ranks 1,2,4,8,16,32 --out analysis/extract \\
      --reference runs/sst2-lora-r8
  deltatune eval --run runs/sst2-full --adapter analysis/extract/r8
  deltatune analyze intrinsic-dimension --config examples/sst2-minilm-lora.yaml \\
      --dimensions 10,100,1000,10000 --out analysis/intrinsic"""


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="what a fine-tune changed: ΔW spectrum, LoRA extraction",
                       description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    spectrum = kinds.add_parser("spectrum", help="singular values of each layer's ΔW",
                                description="Singular-value spectrum of each changed linear "
                                "layer's ΔW in RUN; writes spectrum.md/.json/.png into --out.")
    _common(spectrum)
    spectrum.set_defaults(handler=cmd_spectrum)
    extract = kinds.add_parser("extract-lora", help="LoRA adapters from a run's ΔW by SVD",
                               description="Truncated SVD of RUN's ΔW at each rank, written as "
                               "PEFT-format LoRA adapters (--out/r<rank>/) and evaluated.")
    _common(extract)
    extract.add_argument("--ranks", default="1,2,4,8,16,32", metavar="R1,R2,...",
                         help="LoRA ranks to extract (default 1,2,4,8,16,32)")
    extract.add_argument("--reference", action="append", default=[], metavar="RUN",
                         help="a run shown next to the extracted adapters (e.g. a LoRA trained "
                         "at one of the ranks); repeatable")
    extract.add_argument("--no-eval", action="store_true", help="write the adapters only")
    extract.set_defaults(handler=cmd_extract_lora)
    _add_intrinsic_parser(kinds)


def _add_intrinsic_parser(kinds: argparse._SubParsersAction) -> None:
    intrinsic = kinds.add_parser(
        "intrinsic-dimension", help="d90: train in random d-dimensional subspaces",
        description="Trains --config with full fine-tuning and in a random d-dimensional "
        "subspace of the parameters for each --dimensions d (method 'subspace'), and reports "
        "d90, the smallest d reaching 90 % of full fine-tuning's metric.")
    intrinsic.add_argument("--config", required=True, metavar="YAML",
                           help="a run config (model, task, data, train, eval) as for "
                           "`deltatune train --config`; its method is replaced")
    intrinsic.add_argument("--dimensions", default="10,100,1000,10000", metavar="D1,D2,...",
                           help="subspace dimensions to sweep (default 10,100,1000,10000)")
    intrinsic.add_argument("--out", required=True, metavar="DIR",
                           help="comparison folder: one run directory per d, plus full/")
    intrinsic.add_argument("--full-run", metavar="RUN", help="an existing full fine-tune of "
                           "the same config to compare against instead of training one")
    intrinsic.add_argument("--lr", type=float, default=0.1, help="learning rate of z "
                           "(default 0.1: z moves unit-length directions of all weights)")
    intrinsic.add_argument("--full-lr", type=float, help="learning rate of the full "
                           "fine-tune (default: the config's if its method is full, else 5e-5)")
    intrinsic.add_argument("--projection-seed", type=int, default=0,
                           help="seed of the random projection P (default 0)")
    intrinsic.add_argument("--include-embeddings", action="store_true",
                           help="project the token-embedding matrices too (off: they stay "
                           "frozen, as they barely move in fine-tuning)")
    intrinsic.add_argument("--no-progress", action="store_true", help="no progress bars")
    intrinsic.set_defaults(handler=cmd_intrinsic_dimension)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a finished `deltatune train` run directory")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write (must be new or empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_spectrum(args: argparse.Namespace) -> int:
    from deltatune.analyze.spectrum import SpectrumRequest, analyze_spectrum
    summary = analyze_spectrum(SpectrumRequest(args.run, args.out, args.overwrite,
                                               not args.no_progress))
    for kind in summary["kinds"]:
        kind.pop("mean_cumulative_energy")
    print(json.dumps(summary, indent=2))
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from deltatune.analyze.extract import ExtractRequest, extract_lora
    summary = extract_lora(ExtractRequest(args.run, _ranks(args.ranks), args.out,
                                          evaluate=not args.no_eval,
                                          references=list(args.reference),
                                          overwrite=args.overwrite,
                                          progress=not args.no_progress))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_intrinsic_dimension(args: argparse.Namespace) -> int:
    from deltatune.analyze.intrinsic import (IntrinsicRequest, measure_intrinsic_dimension,
                                             read_base_config)
    result = measure_intrinsic_dimension(IntrinsicRequest(
        base=read_base_config(args.config), dimensions=_integers(args.dimensions, "--dimensions"),
        out=args.out, full_run=args.full_run, learning_rate=args.lr,
        full_learning_rate=args.full_lr, projection_seed=args.projection_seed,
        include_embeddings=args.include_embeddings, progress=not args.no_progress))
    print(json.dumps({k: v for k, v in result.items() if k != "dimensions"}, indent=2))
    return 0


def _ranks(text: str) -> list[int]:
    return _integers(text, "--ranks")


def _integers(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} '{text}' is not a comma-separated list of integers; write "
                          f"e.g. {flag} 1,4,16") from None
