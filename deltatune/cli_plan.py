"""The `deltatune plan` subcommand: its flags and --help, a progress bar over the probe runs,
the table of estimates and the recommendation (deltatune/plan/). `deltatune/cli.py` registers it
with `add_plan_parser`; user mistakes raise DeltatuneError subclasses, which `cli.main` prints as
one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import sys

from deltatune.errors import ConfigError

_DESCRIPTION = """\
Before training: for each fine-tuning method, the estimated peak memory of a `deltatune train`
run of MODEL at this batch size and sequence length — split into weights, gradients, AdamW
state and activations (which include the Python/torch runtime) — whether it fits the memory
you have, the estimated seconds per optimizer step on this machine, and a recommendation
(full fine-tuning for small models with room to spare, LoRA/adapters for mid-size ones, QLoRA
when memory is tight, prefix/prompt tuning at the extreme) among the methods that fit.

The estimate is measured, not modelled: each method trains for a few steps on randomly
initialised copies of MODEL with a quarter and a half of its layers (real widths, real
tokenizer, synthetic examples that fill every batch to --max-length), in fresh `deltatune
train` processes, and the peak memory and step time are extrapolated linearly to the model's
depth. Eight methods take a few minutes.

The memory budget is --memory, else the total memory of --device cuda:N, else the RAM
available on this machine now. See docs/plan.md for how accurate it is."""

_EPILOG = """\
examples:
  deltatune plan --model smollm2-135m --batch-size 4 --max-length 256
  deltatune plan --model minilm-l6 --task classification --batch-size 32 --max-length 128 \\
      --memory 2GB --out plans/minilm
  deltatune plan --model smollm2-135m --methods lora,qlora,ia3 --memory 8GiB"""


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from deltatune.plan.planner import PLAN_METHODS

    p = sub.add_parser("plan", help="estimate memory and time per method before training, "
                       "and recommend one", description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a known name (deltatune models), a local folder or a hub id; only its "
                   "config and tokenizer are read")
    p.add_argument("--task", default="causal-lm",
                   help="causal-lm (default), classification or text")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--max-length", type=int, default=256,
                   help="tokens per example; the plan assumes every example fills it "
                   "(default 256)")
    p.add_argument("--eval-batch-size", type=int, default=32,
                   help="evaluation batch size of the run planned (default 32)")
    p.add_argument("--methods", default=",".join(PLAN_METHODS), metavar="M1,M2,...",
                   help=f"methods to estimate (default all: {','.join(PLAN_METHODS)})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--memory", metavar="SIZE",
                        help="memory to fit in, e.g. 24GB, 16GiB, 512MB (default: the RAM "
                        "available here)")
    budget.add_argument("--device", metavar="DEVICE",
                        help="cpu, or cuda:N to fit in that GPU's total memory")
    p.add_argument("--num-labels", type=int, default=2,
                   help="classes of a classification head (default 2)")
    p.add_argument("--probe-steps", type=int, default=3,
                   help="optimizer steps of each probe run (default 3; the first is not timed)")
    p.add_argument("--out", metavar="DIR",
                   help="also write config.json, plan.json and plan.md into this new folder")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a folder's own Python code define the model (read it first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_plan)


def request_from_args(args: argparse.Namespace):
    from deltatune.plan.planner import PlanRequest

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty; name at least one method, e.g. --methods lora")
    return PlanRequest(model=args.model, task=args.task, methods=methods,
                       batch_size=args.batch_size, max_length=args.max_length,
                       eval_batch_size=args.eval_batch_size, steps=args.probe_steps,
                       memory=args.memory, device=args.device, num_labels=args.num_labels,
                       trust_remote_code=args.trust_remote_code)


def cmd_plan(args: argparse.Namespace) -> int:
    from deltatune.plan.planner import (COLUMNS, PROBE_RUNS, make_plan, markdown_table,
                                        table_rows, write_plan)

    request = request_from_args(args)
    request.check()
    if args.out:  # refuse a bad --out before minutes of probing
        from deltatune.fileio import checked_output_folder
        checked_output_folder(args.out, args.overwrite, [], "")
    with _progress_bar(len(request.methods) * PROBE_RUNS, not args.no_progress) as bar:
        plan = make_plan(request, progress=bar)
    print(markdown_table(COLUMNS, table_rows(plan)))
    for estimate in plan.estimates:
        if not estimate.measurable:
            print(f"{estimate.method}: {estimate.error}")
    print(f"budget: {plan.budget.bytes / 1e9:.2f} GB ({plan.budget.source})")
    rec = plan.recommendation
    print(f"recommendation: {rec.method or 'none'} — {rec.reason}")
    for note in plan.notes:
        print(f"note: {note}")
    if args.out:
        print(f"wrote {write_plan(plan, args.out, args.overwrite)}")
    return 0


class _progress_bar:
    """A tqdm bar on stderr advanced once per probe run, labelled with the run starting."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar, self.started = total, enabled, None, 0

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc="probe runs", unit="run", file=sys.stderr)
        return self

    def __call__(self, label: str) -> None:
        if self.bar is None:
            return
        if self.started:  # the previous run has finished
            self.bar.update(1)
        self.started += 1
        self.bar.set_postfix_str(label)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            if exc[0] is None:
                self.bar.update(self.total - self.bar.n)
            self.bar.close()
