"""Intrinsic dimension (issue 17, `deltatune analyze intrinsic-dimension`): MiniLM-L6 on SST-2
trained in random d-dimensional subspaces of its weights (method `subspace`: θ = θ₀ + P z with a
Fastfood projection, embeddings frozen) for a sweep of d, against full fine-tuning of the same
config; d90 is the smallest d reaching 90 % of full fine-tuning's dev accuracy.

    python benchmarks/intrinsic.py [--work /tmp/deltatune_intrinsic] [--full-run RUN]
        [--dimensions 64,256,1024,4096,16384] [--lr 0.1]

The shared config is benchmarks/compare_minilm_sst2/base.yaml (the first 2,000 SST-2 sentences,
one epoch, batch 16, max length 64, seed 0; 872 dev sentences). `--full-run` reuses a finished
full fine-tune of that config (the one `benchmarks/compare_methods.py` trains) instead of
training one. Runs go to --work, finished ones are reused; the table, plot and numbers are copied
to benchmarks/intrinsic/. Nothing else should run on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "compare_minilm_sst2" / "base.yaml"
OUT = ROOT / "benchmarks" / "intrinsic"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/deltatune_intrinsic",
                        help="folder for the run directories (outside the repository)")
    parser.add_argument("--full-run", help="finished full fine-tune of the base config")
    parser.add_argument("--dimensions", default="64,256,1024,4096,16384")
    parser.add_argument("--lr", default="0.1", help="learning rate of z")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from deltatune.quant.precision import cpu_name

    print(f"CPU: {cpu_name()}", flush=True)
    if not (ROOT.parent / "shared" / "data" / "sst2" / "train.tsv").is_file():
        print("SST-2 not found under ../shared/data/sst2; nothing to run", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "deltatune", "analyze", "intrinsic-dimension",
               "--config", str(BASE.relative_to(ROOT)), "--dimensions", args.dimensions,
               "--lr", args.lr, "--out", args.work, "--no-progress"]
    if args.full_run:
        command += ["--full-run", args.full_run]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    OUT.mkdir(exist_ok=True)
    for name in ("summary.json", "intrinsic.md", "intrinsic.png"):
        shutil.copy2(Path(args.work) / name, OUT / name)
    print(f"done in {time.perf_counter() - started:.0f} s; table: {OUT / 'intrinsic.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
