"""Load benchmark for `deltatune serve`: 4 LoRA adapters on smollm2-135m, 64 concurrent chat
requests (round-robin over the adapters) sent over loopback to the real server process, in
five set-ups measured in one run:

- mixed:        the 4 adapters on one base, mixed-adapter batches (the default policy);
- merged:       the same load all on one merged model (adapter a0 folded into the base: no
                adapter cost at all; the ceiling);
- single-lora:  all 64 requests to one adapter, unmerged (what unmerged LoRA costs alone);
- swap:         `--policy swap`: a batch holds one adapter's requests in arrival order and that
                adapter is merged into the base first (how a single-adapter server serves many);
- swap-grouped: `--policy swap-grouped`: the batch takes every waiting request of the oldest
                request's adapter (a single-adapter server that sorts its queue: full batches,
                one swap per batch).

Reported: total generated tokens/s (all completion tokens / wall time from the first request
to the last answer) and p50 / p95 request latency, and the ratios to merged. The goal is mixed
within 1.5x of merged and faster than swap. Also, in-process: how long switching the active
adapter, offloading it to disk and bringing it back, and merging it take.

The adapters are LoRA r=16 on every linear layer of the model (the most work per token an
adapter adds) with random B factors (small, so the answers stay fluent): throughput does not
depend on what an adapter learned. Greedy decoding, max_tokens 32, prompts are the first 64
Alpaca instructions.

    .venv/bin/python benchmarks/serve_load.py --work /tmp/serve_bench
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltatune.quant.precision import cpu_flags, cpu_name  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = "smollm2-135m"
ADAPTERS = 4


def make_adapters(work: Path, rank: int) -> list[Path]:
    import deltatune
    from deltatune.methods import config_class
    from deltatune.methods.adapter_io import save_adapter
    from deltatune.models import load_model

    folders = []
    for index in range(ADAPTERS):
        folder = work / "adapters" / f"a{index}"
        folders.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        model = load_model(MODEL).model
        handle = deltatune.apply(model, config_class("lora").from_options(
            {"r": rank, "alpha": 2 * rank, "targets": ["all-linear"]}))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in handle.named_trainable_parameters().items():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.002)
        save_adapter(handle, folder, base_model_name_or_path=MODEL)
    return folders


def merged_model(work: Path, adapter: Path) -> Path:
    from deltatune.jobs.export import ExportRequest, export_merged

    folder = work / "merged-a0"
    if not (folder / "config.json").is_file():
        export_merged(ExportRequest(out=str(folder), model=MODEL, adapter=str(adapter),
                                    overwrite=True, progress=False))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`deltatune serve` as a child process on a free loopback port."""

    def __init__(self, model: str, adapters: dict[str, Path], policy: str, batch: int):
        self.port = free_port()
        command = [sys.executable, "-m", "deltatune", "serve", "--model", model,
                   "--port", str(self.port), "--policy", policy,
                   "--max-batch-size", str(batch), "--batch-wait-ms", "20"]
        for name, folder in adapters.items():
            command += ["--adapter", f"{name}={folder}"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 300) -> list[str]:
        import httpx
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server exited: " + (self.process.stdout.read() or ""))
            try:
                response = httpx.get(self.url + "/models", timeout=2)
                if response.status_code == 200:
                    return [m["id"] for m in response.json()["data"]]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start in time")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def send_all(url: str, requests: list[dict]) -> tuple[float, list[float], int]:
    import httpx

    async def one(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
        start = time.perf_counter()
        response = await client.post(url + "/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, body) for body in requests))
        wall = time.perf_counter() - start
    return wall, [latency for latency, _ in results], sum(tokens for _, tokens in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def prompts(count: int) -> list[str]:
    records = json.loads((SHARED / "instruct" / "alpaca_en_demo.json").read_text())
    return [(r["instruction"] + ("\n" + r["input"] if r.get("input") else ""))[:400]
            for r in records[:count]]


def run_setup(name: str, model: str, adapters: dict[str, Path], policy: str,
              models_for_requests: list[str | None], texts: list[str], max_tokens: int,
              batch: int) -> dict:
    server = Server(model, adapters, policy, batch)
    try:
        served = server.wait_ready()
        base_id = served[0]
        bodies = [{"model": m or base_id, "messages": [{"role": "user", "content": t}],
                   "max_tokens": max_tokens, "temperature": 0}
                  for m, t in zip(models_for_requests, texts)]
        asyncio.run(send_all(server.url, bodies[:2]))  # warm-up
        wall, latencies, tokens = asyncio.run(send_all(server.url, bodies))
    finally:
        server.close()
    result = {"setup": name, "policy": policy, "requests": len(bodies), "wall_s": round(wall, 2),
              "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
              "p50_s": round(percentile(latencies, 0.5), 2),
              "p95_s": round(percentile(latencies, 0.95), 2)}
    print(json.dumps(result), flush=True)
    return result


def switching_costs(adapters: list[Path]) -> dict:
    """In-process: activate / offload to disk + restore / merge + unmerge of one adapter."""
    from deltatune.models import load_model
    from deltatune.serve.bank import AdapterBank

    bank = AdapterBank(load_model(MODEL).model)
    start = time.perf_counter()
    for index, folder in enumerate(adapters):
        bank.load(f"a{index}", folder)
    load_ms = (time.perf_counter() - start) * 1000 / len(adapters)

    def timed(fn, repeats: int = 20) -> float:
        start = time.perf_counter()
        for i in range(repeats):
            fn(i)
        return (time.perf_counter() - start) * 1000 / repeats

    activate_ms = timed(lambda i: bank.activate(f"a{i % len(adapters)}"), 200)
    offload_ms = timed(lambda i: (bank.offload("a1"), bank.restore("a1")), 10)
    merge_ms = timed(lambda i: (bank.merge(f"a{i % 2}"), bank.unmerge()), 10)
    return {"load_ms_per_adapter": round(load_ms, 1), "activate_ms": round(activate_ms, 4),
            "offload_to_disk_and_restore_ms": round(offload_ms, 1),
            "merge_and_unmerge_ms": round(merge_ms, 1)}


def markdown(report: dict) -> str:
    merged = next(r for r in report["results"] if r["setup"] == "merged")
    lines = [f"CPU: {report['cpu']} ({report['threads']} threads), torch {report['torch']}; "
             f"{report['requests']} concurrent requests, {ADAPTERS} LoRA adapters "
             f"(r={report['rank']}, all linear layers), max_tokens {report['max_tokens']}, greedy.",
             "", "| set-up | tokens/s | vs merged | wall s | p50 latency s | p95 latency s "
             "| tokens |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['setup']} | {r['tokens_per_s']} | "
                     f"{merged['tokens_per_s'] / r['tokens_per_s']:.2f}x slower | {r['wall_s']} | "
                     f"{r['p50_s']} | {r['p95_s']} | {r['generated_tokens']} |")
    costs = report["switching"]
    lines += ["", f"Switching the active adapter: {costs['activate_ms']} ms; offload to disk + "
              f"restore: {costs['offload_to_disk_and_restore_ms']} ms; merge + unmerge: "
              f"{costs['merge_and_unmerge_ms']} ms; loading one adapter: "
              f"{costs['load_ms_per_adapter']} ms."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/serve_bench")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--setups", default="mixed,merged,single-lora,swap,swap-grouped")
    parser.add_argument("--out", default=str(Path(__file__).with_name("serve_load.json")))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()} flags: {' '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}",
          flush=True)
    adapters = make_adapters(work, args.rank)
    named = {f"a{i}": folder for i, folder in enumerate(adapters)}
    texts = prompts(args.requests)
    round_robin = [f"a{i % ADAPTERS}" for i in range(args.requests)]
    setups = {
        "mixed": lambda: run_setup("mixed", MODEL, named, "mixed", round_robin, texts,
                                   args.max_tokens, args.requests),
        "merged": lambda: run_setup("merged", str(merged_model(work, adapters[0])), {}, "mixed",
                                    [None] * args.requests, texts, args.max_tokens,
                                    args.requests),
        "single-lora": lambda: run_setup("single-lora", MODEL, {"a0": adapters[0]}, "mixed",
                                         ["a0"] * args.requests, texts, args.max_tokens,
                                         args.requests),
        "swap": lambda: run_setup("swap", MODEL, named, "swap", round_robin, texts,
                                  args.max_tokens, args.requests),
        "swap-grouped": lambda: run_setup("swap-grouped", MODEL, named, "swap-grouped",
                                          round_robin, texts, args.max_tokens, args.requests),
    }
    results = [setups[name]() for name in args.setups.split(",")]
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": MODEL, "requests": args.requests, "max_tokens": args.max_tokens,
              "rank": args.rank, "results": results, "switching": switching_costs(adapters)}
    if os.environ.get("SERVE_BENCH_NO_WRITE") is None:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
