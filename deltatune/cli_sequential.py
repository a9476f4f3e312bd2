"""The `deltatune sequential` subcommand: task A, then task B, ... as one command with one report
(deltatune/jobs/sequential.py). `deltatune/cli.py` registers it; user mistakes raise
DeltatuneError subclasses, which `cli.main` prints as one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import json

_DESCRIPTION = """\
Fine-tune on several tasks one after the other and measure what each stage forgets.

Each --stage is a YAML run config (as for `deltatune train --config`); the first may instead be
a finished run directory to start from. Stage k starts from stage k-1's weights, is evaluated on
every earlier stage's eval file (a classifier's accuracy among that task's own classes: the head
holds the classes of all stages), and uses the mitigation flags below with the earlier stages'
data. Runs go to OUT/01-<name>, OUT/02-<name>, ...; a stage already trained there with the same
settings is reused. OUT/report.md and OUT/sequence_summary.json hold the accuracy matrix."""

_EPILOG = """\
example (SST-2 then TREC on MiniLM, with EWC):
  deltatune sequential --stage examples/forgetting/sst2.yaml \\
      --stage examples/forgetting/trec.yaml --ewc-weight 1000 --out runs/sst2-trec-ewc"""


def add_sequential_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sequential", help="train on task A, then B, ...; report what each "
                       "stage forgets (continual learning)", description=_DESCRIPTION,
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", action="append", required=True, metavar="CONFIG_OR_RUN",
                   help="a stage's YAML run config, in order (the first may be a run dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the stages' runs "
                   "and the report")
    g = p.add_argument_group("mitigations for every stage after the first")
    g.add_argument("--replay-fraction", type=float,
                   help="share of every batch replayed from the previous stage's training data")
    g.add_argument("--ewc-weight", type=float,
                   help="EWC, with the Fisher estimated on the previous stage's training data")
    g.add_argument("--ewc-batches", type=int, help="batches of 4 for the Fisher estimate")
    g.add_argument("--l2sp-weight", type=float,
                   help="L2-SP: squared distance from the weights the stage starts from")
    g.add_argument("--kl-weight", type=float,
                   help="KL to the stage's starting model (language models)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain stages whose folders hold runs with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the models' folders")
    p.set_defaults(handler=cmd_sequential)


def cmd_sequential(args: argparse.Namespace) -> int:
    from deltatune.jobs.sequential import SequentialRequest, run_sequential
    mitigation = {key: getattr(args, key) for key in
                  ("replay_fraction", "ewc_weight", "ewc_batches", "l2sp_weight", "kl_weight")
                  if getattr(args, key) is not None}
    summary = run_sequential(SequentialRequest(
        stages=args.stage, out=args.out, mitigation=mitigation, overwrite=args.overwrite,
        progress=not args.no_progress, trust_remote_code=args.trust_remote_code))
    print(json.dumps(summary, indent=2))
    return 0
