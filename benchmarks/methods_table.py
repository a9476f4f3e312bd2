"""Every adaptation method on the same two workloads, one table: quality before and after
training, trainable parameters, peak memory, training time and adapter bytes on disk.

Workloads (see `WORKLOADS`):

  sst2      MiniLM-L6 sentence classification on SST-2: the first 4,000 training sentences, one
            epoch, batch 32, max length 64, accuracy on the full dev set (872 sentences). The
            job adds the new classification head to `modules_to_save`, so every method
            also trains the head.
  identity  SmolLM2-135M-Instruct taught a new identity (shared/data/instruct/identity.json,
            chat template, name "Deltabot", author "the deltatune team"): 10 % held out,
            3 epochs, batch 8, max length 256; perplexity of the held-out responses, plus the
            identity rate: greedy answers (40 new tokens) to the held-out instructions and to
            "Who are you?" from the *saved* adapter loaded onto a fresh base model, and the
            fraction of them that say "Deltabot".

Each (workload, method) runs `deltatune.jobs.run_training` in its own subprocess
(`--one JSON`), so peak memory (peak RSS on CPU) is that run's own. Textual inversion only
learns something when the data contains its placeholder token, so for it the data is rewritten
to a temporary folder with "<sst2-task> " / "<deltabot-identity> " in front of every input.

    python benchmarks/methods_table.py --quick                       # smoke test, few minutes
    nice -n 5 python benchmarks/methods_table.py --workload both --output docs/methods.md
    python benchmarks/methods_table.py --workload sst2 --methods lora,ia3 --output docs/methods.md

Results are merged into `--json` (default benchmarks/methods_table.json) by (workload, method),
so workloads and methods can be run separately; `--output` rewrites only the part of the
markdown file between the `methods-table` markers (the hand-written text around it stays).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
SST2_TRAIN, SST2_DEV = DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"
IDENTITY = DATA / "instruct" / "identity.json"
JSON_DEFAULT = ROOT / "benchmarks" / "methods_table.json"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"

TI_TOKENS = {"sst2": "<sst2-task>", "identity": "<deltabot-identity>"}
IDENTITY_NAME, IDENTITY_AUTHOR = "Deltabot", "the deltatune team"
WHO_ARE_YOU = "Who are you?"

ORDER = ["lora", "full", "freeze", "adapter", "prefix", "prompt", "ptuning", "ia3",
         "textual-inversion", "hyperlora", "freeze-probe"]

# key -> method name and, per workload, (method options, learning rate). `freeze-probe` is a
# reference row, not an 11th method: the classification head alone (what every SST-2 row trains
# on top of its method), so the table shows what each method adds beyond the head.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora",
             "sst2": ({"r": 8, "alpha": 16, "targets": ["query", "value"]}, 1e-3),
             "identity": ({"r": 8, "alpha": 16, "targets": LLAMA_LINEAR}, 1e-3)},
    "full": {"method": "full", "sst2": ({}, 5e-5), "identity": ({}, 5e-5)},
    "freeze": {"method": "freeze",
               "sst2": ({"mode": "bottom", "num_frozen_layers": 3}, 1e-4),
               "identity": ({"mode": "bottom", "num_frozen_layers": 15}, 1e-4)},
    "adapter": {"method": "adapter", "sst2": ({"variant": "houlsby"}, 1e-3),
                "identity": ({"variant": "houlsby"}, 1e-3)},
    # PEFT's random prefix init wrecks SmolLM2 before training (held-out perplexity 12 -> 1181,
    # measured); initialised from the model's own keys/values of a neutral text it starts at the
    # base model's behaviour, the initialisation Li & Liang recommend.
    "prefix": {"method": "prefix", "sst2": ({"num_virtual_tokens": 20}, 1e-2),
               "identity": ({"num_virtual_tokens": 20, "init_weights": "text",
                             "init_text": "You are a helpful AI assistant."}, 1e-2)},
    "prompt": {"method": "prompt", "sst2": ({"num_virtual_tokens": 20}, 3e-2),
               "identity": ({"num_virtual_tokens": 20}, 3e-2)},
    "ptuning": {"method": "ptuning", "sst2": ({"num_virtual_tokens": 20}, 1e-3),
                "identity": ({"num_virtual_tokens": 20}, 1e-3)},
    "ia3": {"method": "ia3", "sst2": ({}, 1e-2), "identity": ({}, 1e-2)},
    "textual-inversion": {
        "method": "textual-inversion",
        "sst2": ({"placeholder_tokens": [TI_TOKENS["sst2"]]}, 5e-3),
        "identity": ({"placeholder_tokens": [TI_TOKENS["identity"]]}, 5e-3)},
    "hyperlora": {"method": "hyperlora",
                  "sst2": ({"r": 8, "alpha": 16, "targets": ["query", "value"]}, 1e-3),
                  "identity": ({"r": 8, "alpha": 16, "targets": LLAMA_LINEAR}, 1e-3)},
    "freeze-probe": {"method": "freeze", "sst2": ({"mode": "probe"}, 1e-3)},
}

WORKLOADS = {
    "sst2": {"title": "SST-2, MiniLM-L6 (classification)", "metric": "accuracy",
             "higher_is_better": True},
    "identity": {"title": "Identity, SmolLM2-135M-Instruct (instruction tuning)",
                 "metric": "perplexity", "higher_is_better": False},
}


# -- specs -------------------------------------------------------------------------------------

def workload_settings(workload: str, quick: bool) -> dict[str, Any]:
    if workload == "sst2":
        return {"train_limit": 200 if quick else 4000, "eval_limit": 200 if quick else None,
                "epochs": 1, "batch_size": 32, "max_length": 64, "warmup_ratio": 0.0}
    return {"epochs": 1 if quick else 3, "batch_size": 8, "max_length": 256,
            "warmup_ratio": 0.1, "eval_fraction": 0.1}


def build_spec(workload: str, key: str, quick: bool, scratch: Path,
               epochs: int | None = None) -> dict[str, Any]:
    entry = METHODS[key]
    options, learning_rate = entry[workload]
    settings = workload_settings(workload, quick)
    if epochs and workload == "identity":
        settings["epochs"] = epochs
    textual_inversion = entry["method"] == "textual-inversion"
    output_dir = str(scratch / "runs" / f"{workload}-{key}")
    common = {"method": entry["method"], "method_options": options, "seed": 0,
              "output_dir": output_dir, "progress": False}
    train = {"learning_rate": learning_rate, "batch_size": settings["batch_size"],
             "epochs": settings["epochs"], "warmup_ratio": settings["warmup_ratio"],
             "log_every": 10}
    if workload == "sst2":
        train_path, dev_path = SST2_TRAIN, SST2_DEV
        if textual_inversion:
            train_path, dev_path = prefixed_sst2(scratch, TI_TOKENS["sst2"])
        return {**common, "model": "minilm-l6", "task": "classification",
                "data": {"train": str(train_path), "eval": str(dev_path),
                         "columns": {"text": "sentence"}, "eval_columns": {"text": "content"},
                         "train_limit": settings["train_limit"],
                         "eval_limit": settings["eval_limit"],
                         "max_length": settings["max_length"]},
                "train": train, "eval": {"batch_size": 64}}
    data_path = prefixed_identity(scratch, TI_TOKENS["identity"]) if textual_inversion \
        else IDENTITY
    return {**common, "model": "smollm2-135m", "task": "causal-lm",
            "data": {"train": str(data_path), "template": "chat",
                     "max_length": settings["max_length"],
                     "eval_fraction": settings["eval_fraction"],
                     "placeholders": {"name": IDENTITY_NAME, "author": IDENTITY_AUTHOR}},
            "train": train, "eval": {"batch_size": 8, "metric": "perplexity"}}


def prefixed_sst2(scratch: Path, token: str) -> tuple[Path, Path]:
    """Copies of SST-2 train/dev with `token` in front of every sentence (outside the repo)."""
    folder = scratch / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in (SST2_TRAIN, SST2_DEV):
        target = folder / f"sst2-{source.name}"
        with open(source, encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        lines = ["\t".join(rows[0])] + [f"{label}\t{token} {text}" for label, text in rows[1:]]
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(target)
    return paths[0], paths[1]


def prefixed_identity(scratch: Path, token: str) -> Path:
    folder = scratch / "data"
    folder.mkdir(parents=True, exist_ok=True)
    records = json.loads(IDENTITY.read_text(encoding="utf-8"))
    for record in records:
        record["instruction"] = f"{token} {record['instruction']}"
    target = folder / "identity.json"
    target.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return target


# -- one run (in its own process) --------------------------------------------------------------

def run_one(job: dict[str, Any]) -> dict[str, Any]:
    from deltatune.jobs import run_training
    from deltatune.spec import parse_run_spec

    spec = parse_run_spec(job["spec"])
    started = time.perf_counter()
    summary = run_training(spec).as_dict()
    result = {"workload": job["workload"], "key": job["key"], "summary": summary,
              "learning_rate": spec.train.learning_rate, "options": spec.method_options,
              "settings": {"epochs": spec.train.epochs, "batch_size": spec.train.batch_size,
                           "max_length": spec.data.max_length,
                           "warmup_ratio": spec.train.warmup_ratio,
                           "schedule": spec.train.schedule,
                           "train_examples": summary["data"]["train_examples"],
                           "eval_examples": summary["data"]["eval_examples"]}}
    if job["workload"] == "identity":
        result["identity"] = identity_probe(spec, job.get("who_prefix", ""))
    result["process_wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def identity_probe(spec: Any, who_prefix: str, base_only: bool = False,
                   perplexity: bool = False) -> dict[str, Any]:
    """Greedy answers of the *saved* adapter (loaded onto a fresh base model) to the held-out
    instructions and to "Who are you?"; the fraction that mention the new name."""
    from deltatune.data import build_datasets
    from deltatune.data.templates import render_prompt
    from deltatune.eval.evaluate import generate_texts
    from deltatune.jobs import load_for_inference
    from deltatune.jobs.tasks import get_task

    if base_only:
        loaded, _, _ = load_for_inference(spec.model, None, None)
    else:
        loaded, _, _ = load_for_inference(None, None, spec.output_dir)
    tokenizer = loaded.tokenizer
    task = get_task(spec.task)
    held_out = build_datasets(task.resolve_data(spec.data), tokenizer, task.encoding,
                              spec.seed).eval
    prompts = [e["prompt_ids"] for e in held_out]
    prompts.append(render_prompt(f"{who_prefix}{WHO_ARE_YOU}", tokenizer, spec.data.template))
    answers = generate_texts(loaded.model, tokenizer, prompts, max_new_tokens=40, batch_size=8)
    name = IDENTITY_NAME.lower()
    held = [{"instruction": tokenizer.decode(e["prompt_ids"], skip_special_tokens=True)
             .split("user\n")[-1].split("\nassistant")[0].strip(),
             "reference_mentions_name": name in e["reference"].lower(),
             "answer": a.strip(), "mentions_name": name in a.lower()}
            for e, a in zip(held_out, answers)]
    mentions = sum(h["mentions_name"] for h in held)
    extra = {}
    if perplexity:  # the base model's held-out perplexity: the reference for every method
        from deltatune.eval.evaluate import evaluate_perplexity
        extra = evaluate_perplexity(loaded.model, held_out, tokenizer.pad_token_id,
                                    spec.eval.batch_size)
    return {**extra, "held_out": held, "held_out_mentions": mentions, "held_out_count": len(held),
            "held_out_references_mentioning": sum(h["reference_mentions_name"] for h in held),
            "who_are_you": answers[-1].strip(),
            "who_are_you_mentions": name in answers[-1].lower(),
            "rate": (mentions + (name in answers[-1].lower())) / (len(held) + 1)}


def run_base_identity(job: dict[str, Any]) -> dict[str, Any]:
    from deltatune.spec import parse_run_spec
    spec = parse_run_spec(job["spec"])
    return {"workload": "identity", "key": "base-model", "identity": identity_probe(spec, "", base_only=True,
                                                                      perplexity=True)}


# -- the driver --------------------------------------------------------------------------------

def run_subprocess(job: dict[str, Any], log_path: Path, mode: str = "--one",
                   threads: int | None = None) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(job)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                 cwd=ROOT, env=env)
    lines = [l for l in process.stdout.splitlines() if l.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        return {"workload": job["workload"], "key": job["key"],
                "error": f"exit {process.returncode}: " + " | ".join(tail), "log": str(log_path)}
    return json.loads(lines[-1][len("RESULT "):])


def beats_baseline(workload: str, result: dict[str, Any]) -> bool | None:
    summary = result.get("summary")
    if not summary or not summary.get("baseline_metrics"):
        return None
    metric = WORKLOADS[workload]["metric"]
    before, after = summary["baseline_metrics"][metric], summary["final_metrics"][metric]
    return after > before if WORKLOADS[workload]["higher_is_better"] else after < before


def progress_line(index: int, total: int, result: dict[str, Any], seconds: float) -> str:
    head = f"[{index}/{total}] {result['workload']:<8} {result['key']:<18}"
    if "error" in result:
        return f"{head} FAILED ({seconds:.0f} s): {result['error']}"
    if result["key"] == "base-model":
        return f"{head} identity rate {result['identity']['rate']:.2f} ({seconds:.0f} s)"
    s = result["summary"]
    metric = WORKLOADS[result["workload"]]["metric"]
    text = (f"{head} {metric} {s['baseline_metrics'][metric]:.4f} -> "
            f"{s['final_metrics'][metric]:.4f}")
    if "identity" in result:
        text += f", identity rate {result['identity']['rate']:.2f}"
    text += (f" | {s['trainable_parameters']:,} trainable ({s['trainable_percent']:.3f}%), "
             f"peak {s['peak_memory_bytes'] / 2**20:.0f} MB, train {s['train_wall_seconds']:.0f} s, "
             f"adapter {human_bytes(s['adapter_bytes'])} ({seconds:.0f} s in all)")
    if beats_baseline(result["workload"], result) is False:
        text += "  <-- DID NOT BEAT THE BASELINE"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["sst2", "identity", "both"], default="both")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of: {', '.join(ORDER)}, base-model "
                             "(default: all that apply to the workload; freeze-probe is SST-2's "
                             "head-only reference, base-model the identity workload's untouched "
                             "model)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes to smoke-test the script (200 SST-2 sentences and dev "
                             "sentences, 1 identity epoch)")
    parser.add_argument("--identity-epochs", type=int, default=None,
                        help="override the identity epochs (default 3, quick 1)")
    parser.add_argument("--output", default=None, help="markdown file to write the table into")
    parser.add_argument("--json", default=str(JSON_DEFAULT),
                        help="raw results, merged by (workload, method)")
    parser.add_argument("--fresh", action="store_true",
                        help="start the JSON over instead of merging into it")
    parser.add_argument("--scratch", default=None,
                        help="folder for run directories, logs and rewritten data "
                             "(default: a new temporary folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per run (default: torch's default, one per "
                             "core). On a machine shared with other jobs, 1 is much faster: "
                             "OpenMP threads wait for each other whenever one is descheduled")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-identity", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one or args.base_identity:
        job = json.loads(args.one or args.base_identity)
        result = run_one(job) if args.one else run_base_identity(job)
        result["torch_threads"] = __import__("torch").get_num_threads()
        text = json.dumps(result, default=str)
        if job.get("result_path"):
            Path(job["result_path"]).write_text(text + "\n", encoding="utf-8")
        print("RESULT " + text, flush=True)
        return 0

    workloads = ["sst2", "identity"] if args.workload == "both" else [args.workload]
    requested = [m.strip() for m in args.methods.split(",")] if args.methods else None
    unknown = sorted(set(requested or []) - set(METHODS) - {"base-model"})
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(ORDER)}")
    scratch = Path(args.scratch) if args.scratch else \
        Path(tempfile.mkdtemp(prefix="deltatune-methods-table-"))
    scratch.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, dict[str, Any]]] = []
    for workload in workloads:
        keys = [k for k in ORDER if workload in METHODS[k] and (requested is None or k in requested)]
        if workload == "identity" and (requested is None or "base-model" in requested):
            spec = build_spec("identity", "lora", args.quick, scratch, args.identity_epochs)
            jobs.append(("--base-identity", {"workload": workload, "key": "base-model",
                                             "spec": spec}))
        for key in keys:
            job = {"workload": workload, "key": key,
                   "spec": build_spec(workload, key, args.quick, scratch, args.identity_epochs)}
            if METHODS[key]["method"] == "textual-inversion" and workload == "identity":
                job["who_prefix"] = TI_TOKENS["identity"] + " "
            jobs.append(("--one", job))

    command = "python benchmarks/methods_table.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"{len(jobs)} runs; run directories and logs under {scratch}", flush=True)
    from deltatune.fileio import write_json
    results = []
    for index, (mode, job) in enumerate(jobs, start=1):
        started = time.perf_counter()
        name = f"{job['workload']}-{job['key']}"
        job["result_path"] = str(scratch / "results" / f"{name}.json")
        Path(job["result_path"]).parent.mkdir(parents=True, exist_ok=True)
        result = run_subprocess(job, scratch / "logs" / f"{name}.log", mode, args.threads)
        result["quick"] = args.quick
        result["command"] = command
        result["process_seconds"] = round(time.perf_counter() - started, 1)
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results.append(result)
        print(progress_line(index, len(jobs), result, time.perf_counter() - started), flush=True)
        # Written after every run, so a long table that is interrupted keeps what it measured.
        merged = merge_results(Path(args.json), results, args.quick, args.fresh)
        write_json(args.json, merged)
        if args.output:
            write_markdown(Path(args.output), merged)
    print(f"raw results: {args.json}" + (f"; table: {args.output}" if args.output else ""))
    failures = [r for r in results if "error" in r or
                (r["key"] != "base-model" and beats_baseline(r["workload"], r) is False)]
    for r in failures:
        print(f"WARNING: {r['workload']} {r['key']}: "
              f"{r.get('error') or 'did not beat the untrained baseline'}")
    return 1 if any("error" in r for r in results) else 0


def merge_results(path: Path, results: list[dict], quick: bool, fresh: bool) -> dict[str, Any]:
    old: dict[str, Any] = {}
    if path.is_file() and not fresh:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("quick") != quick:  # never mix smoke-test numbers with real ones
            old = {}
    runs = {(r["workload"], r["key"]): r for r in old.get("runs", [])}
    runs.update({(r["workload"], r["key"]): r for r in results})
    import torch
    return {"quick": quick, "machine": machine_description(), "torch": torch.__version__,
            "runs": sorted(runs.values(), key=lambda r: (
                list(WORKLOADS).index(r["workload"]),
                -1 if r["key"] == "base-model" else ORDER.index(r["key"])))}


def machine_description() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}"


# -- markdown ----------------------------------------------------------------------------------

def human_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def options_text(options: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, list):
            return ",".join(map(str, v)) if len(v) < 7 else "all 7 linear"
        return f'"{v}"' if isinstance(v, str) and " " in v else str(v)
    return " ".join(f"{k}={value(v)}" for k, v in options.items() if k != "placeholder_tokens") \
        or "defaults"


def render_tables(merged: dict[str, Any]) -> str:
    runs = merged["runs"]
    out = [f"<!-- generated by benchmarks/methods_table.py; edit outside the markers -->"]
    if merged.get("quick"):
        out.append("\n**QUICK SMOKE-TEST SIZES — not the real numbers.**")
    commands = sorted({r.get("command", "") for r in runs if r.get("command")})
    threads = sorted({str(r["torch_threads"]) for r in runs if "torch_threads" in r})
    out.append(f"\nMachine: {merged['machine']}; torch {merged['torch']} with "
               f"{'/'.join(threads) or '?'} thread(s) per run. "
               "Command(s): " + "; ".join(f"`{c}`" for c in commands) + ".")
    for workload, info in WORKLOADS.items():
        rows = [r for r in runs if r["workload"] == workload]
        if not rows:
            continue
        metric = info["metric"]
        arrow = "higher is better" if info["higher_is_better"] else "lower is better"
        out.append(f"\n### {info['title']}\n")
        settings = {json.dumps(r["settings"], sort_keys=True) for r in rows if "settings" in r}
        for text in sorted(settings):
            st = json.loads(text)
            out.append(f"{st['train_examples']:,} training examples, {st['eval_examples']:,} "
                       f"evaluation examples, {st['epochs']} epoch(s), batch {st['batch_size']}, "
                       f"max length {st['max_length']}, AdamW, {st['schedule']} schedule, "
                       f"warmup ratio {st['warmup_ratio']:g}, seed 0; {metric}: {arrow}.\n")
        header = ["method", "options", "lr", f"untrained {metric}", f"trained {metric}",
                  "beats baseline"]
        if workload == "identity":
            header += ["beats base model", "identity rate"]
        header += ["trainable params", "trainable %", "peak memory (MB)", "train wall (s)",
                   "adapter on disk"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        base = next((r for r in rows if r["key"] == "base-model"), None)
        for r in rows:
            if r["key"] == "base-model":
                continue
            if "error" in r:
                out.append(f"| {r['key']} | failed: {r['error'][:120]} |" + " |" * (len(header) - 2))
                continue
            s = r["summary"]
            ok = beats_baseline(workload, r)
            cells = [f"`{r['key']}`" if r["key"] != "freeze-probe" else "`freeze` probe (head only, reference)",
                     options_text(r["options"]), f"{r['learning_rate']:g}",
                     f"{s['baseline_metrics'][metric]:.4g}", f"**{s['final_metrics'][metric]:.4g}**",
                     "yes" if ok else "**NO**"]
            if workload == "identity":
                ident = r["identity"]
                base_ppl = base["identity"].get("perplexity") if base and "identity" in base \
                    else None
                cells.append("?" if base_ppl is None else
                             "yes" if s["final_metrics"][metric] < base_ppl else "**NO**")
                cells.append(f"{ident['held_out_mentions'] + ident['who_are_you_mentions']}/"
                             f"{ident['held_out_count'] + 1}")
            cells += [f"{s['trainable_parameters']:,}", f"{s['trainable_percent']:.3g}",
                      f"{s['peak_memory_bytes'] / 2**20:,.0f}", f"{s['train_wall_seconds']:.0f}",
                      human_bytes(s["adapter_bytes"])]
            out.append("| " + " | ".join(cells) + " |")
        if workload == "identity":
            out.append("")
            if base and "identity" in base:
                ident = base["identity"]
                ppl = ident.get("perplexity")
                out.append((f"Base model without any method: held-out perplexity {ppl:.4g} "
                            "(also the untrained value of every method that starts as the "
                            "identity function); " if ppl else "Base model: ") +
                           f"identity rate "
                           f"{ident['held_out_mentions'] + ident['who_are_you_mentions']}/"
                           f"{ident['held_out_count'] + 1}; \"{WHO_ARE_YOU}\" → "
                           f"\"{one_line(ident['who_are_you'])}\".")
            any_ident = next((r["identity"] for r in rows if "identity" in r), None)
            if any_ident:
                out.append(f"Identity rate = answers containing \"{IDENTITY_NAME}\" among the "
                           f"{any_ident['held_out_count']} held-out instructions plus "
                           f"\"{WHO_ARE_YOU}\" (greedy, 40 new tokens, the saved adapter loaded "
                           f"on a fresh base); {any_ident['held_out_references_mentioning']} of "
                           f"the {any_ident['held_out_count']} held-out reference answers "
                           f"contain the name.")
            out.append(f"\nAnswers to \"{WHO_ARE_YOU}\" after training:\n")
            out.append("| method | answer |")
            out.append("|---|---|")
            for r in rows:
                if "identity" in r and r["key"] != "base-model":
                    out.append(f"| `{r['key']}` | {one_line(r['identity']['who_are_you'])} |")
    return "\n".join(out) + "\n"


def one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


SKELETON = f"""# All methods on the same data

(Write the description and commentary around the generated block.)

{START}
{END}
"""


def write_markdown(path: Path, merged: dict[str, Any]) -> None:
    from deltatune.fileio import write_text
    text = path.read_text(encoding="utf-8") if path.is_file() else SKELETON
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    write_text(path, f"{before}{START}\n{render_tables(merged)}{END}{after}")


if __name__ == "__main__":
    sys.exit(main())
