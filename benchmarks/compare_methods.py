"""Method comparison on MiniLM-L6 / SST-2 (issue 17, `deltatune compare`): full fine-tuning,
LoRA, bottleneck adapters and prefix tuning trained on the same 2,000 SST-2 sentences (one
epoch, batch 16, max length 64, seed 0; benchmarks/compare_minilm_sst2/base.yaml), each
evaluated on the 872 dev sentences; then the report rendered into
benchmarks/compare_minilm_sst2/ (report.md + PNGs, report.html, report.json).

    python benchmarks/compare_methods.py [--work /tmp/compare_minilm_sst2] [--memory 24GB]

The run directories (checkpoints, weights) go to --work, never into the repository; a finished
variant there is reused, so a second call only re-renders the report. Each variant trains in its
own process (`deltatune train`), one after the other: nothing else should run on the machine
meanwhile, or the times and tokens/s mean little.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "compare_minilm_sst2"
BASE = OUT / "base.yaml"
METHODS = "full,lora,adapter,prefix"
TITLE = "Method comparison: MiniLM-L6 on SST-2 (2,000 sentences, 1 epoch)"


def _deltatune(*arguments: str) -> None:
    command = [sys.executable, "-m", "deltatune", *arguments]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/compare_minilm_sst2",
                        help="comparison folder for the runs (outside the repository)")
    parser.add_argument("--memory", help="memory budget for the recommendation, e.g. 24GB")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from deltatune.quant.precision import cpu_name

    print(f"CPU: {cpu_name()}", flush=True)
    if not (ROOT.parent / "shared" / "data" / "sst2" / "train.tsv").is_file():
        print("SST-2 not found under ../shared/data/sst2; nothing to run", file=sys.stderr)
        return 1
    budget = ["--memory", args.memory] if args.memory else []
    started = time.perf_counter()
    _deltatune("compare", "--config", str(BASE.relative_to(ROOT)), "--methods", METHODS,
               "--out", args.work, "--no-progress", "--title", TITLE, *budget)
    _deltatune("report", args.work, "--out", str(OUT.relative_to(ROOT)), "--title", TITLE,
               *budget)
    print(f"done in {time.perf_counter() - started:.0f} s; report: {OUT / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
