"""ΔW spectrum and LoRA extraction (issue 17, `deltatune analyze`): MiniLM-L6 fully fine-tuned
on SST-2, the singular-value spectrum of its update, and LoRA adapters extracted from it by
truncated SVD at several ranks, each evaluated on the SST-2 dev set (872 sentences) next to the
full fine-tune and LoRA adapters trained at ranks 8 and 1 on the same data.

    python benchmarks/analysis.py [--work /tmp/deltatune_analysis] [--train-limit 4000]

Training: the first --train-limit SST-2 sentences, 1 epoch, batch 32, max length 64; full
fine-tuning at lr 5e-5, LoRA (all linear layers, alpha = 2r) at lr 1e-3, seed 0 (the settings of
benchmarks/methods_table.py). Finished runs in --work are reused. Writes
benchmarks/analysis.json and copies the two plots to benchmarks/analysis_*.png. Nothing else
should run on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltatune.analyze.extract import ExtractRequest, extract_lora  # noqa: E402
from deltatune.analyze.spectrum import SpectrumRequest, analyze_spectrum  # noqa: E402
from deltatune.jobs import run_training  # noqa: E402
from deltatune.quant.precision import cpu_flags, cpu_name  # noqa: E402
from deltatune.spec import parse_run_spec  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SST2 = {"train": str(DATA / "sst2/train.tsv"), "eval": str(DATA / "sst2/dev.tsv"),
        "columns": {"text": "sentence"}, "eval_columns": {"text": "content"},
        "max_length": 64}
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
RANKS = [1, 2, 4, 8, 16, 32, 64, 128]
RUNS = {"full": ("full", {}, 5e-5),
        "lora-r8": ("lora", {"r": 8, "alpha": 16, "targets": ["all-linear"]}, 1e-3),
        "lora-r1": ("lora", {"r": 1, "alpha": 2, "targets": ["all-linear"]}, 1e-3)}


def train(work: Path, name: str, train_limit: int) -> Path:
    run = work / name
    if (run / "summary.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    method, options, lr = RUNS[name]
    started = time.perf_counter()
    run_training(parse_run_spec({
        "model": "minilm-l6", "task": "classification", "method": method,
        "method_options": options, "progress": False, "output_dir": str(run), "seed": 0,
        "data": {**SST2, "train_limit": train_limit},
        "train": {"epochs": 1, "batch_size": 32, "learning_rate": lr},
        "eval": {"baseline": False}}))
    print(f"trained {name} in {time.perf_counter() - started:.0f} s")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/deltatune_analysis")
    parser.add_argument("--train-limit", type=int, default=4000)
    args = parser.parse_args()
    if not (DATA / "sst2/train.tsv").is_file():
        raise SystemExit(f"SST-2 is not in {DATA / 'sst2'} (see ../shared/data/README)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = sorted(flag for flag in cpu_flags() if flag in SPEED_FLAGS)
    print(f"cpu: {cpu_name()} ({', '.join(flags) or 'no AVX2'}), torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    runs = {name: train(work, name, args.train_limit) for name in RUNS}
    spectrum = analyze_spectrum(SpectrumRequest(str(runs["full"]), str(work / "spectrum"),
                                                overwrite=True, progress=False))
    extracted = extract_lora(ExtractRequest(str(runs["full"]), RANKS, str(work / "extract"),
                                            references=[str(runs["lora-r8"]),
                                                        str(runs["lora-r1"])],
                                            overwrite=True, progress=False))
    print((work / "spectrum" / "spectrum.md").read_text().split("\n\n| layer |")[0])
    print((work / "extract" / "extract.md").read_text())
    for source, target in ((work / "spectrum" / "spectrum.png", "analysis_spectrum.png"),
                           (work / "extract" / "metric_vs_rank.png", "analysis_extract.png")):
        shutil.copy(source, ROOT / "benchmarks" / target)
    for kind in spectrum["kinds"]:
        kind.pop("mean_cumulative_energy")
    out = ROOT / "benchmarks" / "analysis.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                               "train_limit": args.train_limit, "spectrum": spectrum,
                               "extract": extracted}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
