"""Where the time of one training step goes: a profile table per side of train_speed.py.

Builds a side exactly as `benchmarks/train_speed.py` does (same model, LoRA, batches), runs
`--warmup` steps, then profiles `--steps` steps with torch.profiler and prints the self CPU time
grouped into the parts of a step (base matmuls, LoRA matmuls, attention, elementwise/norms,
loss head, optimizer, memory page faults...), plus the top operators. Example:

    python benchmarks/profile_step.py --side deltatune --workload alpaca --threads 2
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_speed  # noqa: E402  (the side definitions are shared, not copied)

# Operator name -> part of the step. Matmuls are split by shape later (LoRA: one side = rank).
ATTENTION_OPS = ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::baddbmm")
OPTIMIZER_OPS = ("_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index",
            "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::new_zeros",
            "aten::to", "aten::_to_copy", "aten::slice_backward", "aten::index_select")
LOSS_OPS = ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "ChunkedLinearCrossEntropy")


def part_of(name: str, shapes: list) -> str:
    if any(op in name for op in LOSS_OPS):
        return "loss (head softmax/CE)"
    if any(op in name for op in ATTENTION_OPS):
        return "attention (SDPA + softmax)"
    if name in MATMUL_OPS:
        small = [s for s in shapes if s and len(s) >= 2 and min(s[-2:]) <= train_speed.RANK]
        return "LoRA matmuls (rank 16)" if small else "base/head matmuls"
    if any(op in name for op in OPTIMIZER_OPS):
        return "optimizer (AdamW)"
    if any(name.startswith(op) for op in COPY_OPS):
        return "copies / allocation"
    if name.startswith("aten::"):
        return "elementwise, norms, rotary, other aten"
    return "autograd / python glue"


def profile_side(side: str, workload: str, warmup: int, steps: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(train_speed.SEED)
    variant = train_speed.VARIANTS[side]
    model, tokenizer, parameters, train_step = train_speed._build(variant)
    optimizer = torch.optim.AdamW(parameters, lr=train_speed.LEARNING_RATE)
    batches = train_speed._batches(workload, variant, tokenizer, warmup + steps)
    model.train()

    def step(batch):
        loss = train_step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch, *_ in batches[:warmup]:
        step(batch)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch, *_ in batches[warmup:]:
            step(batch)
    wall = time.perf_counter() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    real = sum(entry[1] for entry in batches[warmup:])
    print_profile(side, workload, prof, wall, real, faults, steps)


def print_profile(side: str, workload: str, prof, wall: float, real: int, faults: int,
                  steps: int) -> None:
    parts: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        parts[part_of(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e6
    profiled = sum(parts.values())
    print(f"\n## {side}, {workload}: {steps} profiled steps, {real} real tokens, wall {wall:.1f} s "
          f"({real / wall:.1f} real tok/s under the profiler), {faults / steps:,.0f} minor page "
          f"faults per step")
    print("\n| part of the step | self CPU s per step | share |\n|---|---|---|")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds / steps:.2f} | {100 * seconds / profiled:.1f}% |")
    print("\nTop operators (self CPU):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", default="deltatune", choices=list(train_speed.VARIANTS))
    parser.add_argument("--workload", default="alpaca", choices=list(train_speed.WORKLOADS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    from deltatune.train.speed import set_threads
    set_threads(args.threads)
    profile_side(args.side, args.workload, args.warmup, args.steps)


if __name__ == "__main__":
    main()
