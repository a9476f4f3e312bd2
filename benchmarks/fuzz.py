"""The big fuzz run: N seeded bad inputs through the real `deltatune` command (the harness and
its property are in tests/fuzz/harness.py), with a progress bar, then the counts by generator
and by error kind and every case that broke the property. Writes the tally as JSON.

    python benchmarks/fuzz.py --cases 10000 --json benchmarks/fuzz_results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of fuzzed inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generators")
    parser.add_argument("--json", help="write the tally here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from tqdm import tqdm

    from deltatune.fileio import write_json
    from tests.fuzz.harness import run_fuzz, tally
    from train_speed import cpu_name

    torch.set_num_threads(1)
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores; "
          f"cases {args.cases}, seed {args.seed}", flush=True)
    bar = tqdm(total=args.cases, unit="case")
    problems = 0

    def progress(index, outcome):
        nonlocal problems
        problems += outcome.problem is not None
        bar.set_postfix(problems=problems)
        bar.update()

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="deltatune-fuzz-") as root:
        outcomes = run_fuzz(args.cases, args.seed, Path(root), progress)
    bar.close()
    counts = {**tally(outcomes), "seconds": round(time.monotonic() - start, 1)}
    print(json.dumps({k: v for k, v in counts.items() if k != "by_error_kind"}, indent=2))
    print("by error kind:")
    for signature, count in counts["by_error_kind"].items():
        print(f"  {count:6d}  {signature}")
    if args.json:
        write_json(args.json, counts)
    return 1 if counts["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
