"""The fuzz harness: seeded generators of bad (and good) inputs for the `deltatune` command —
data files, YAML configs, `-o` method options and tampered run directories — and the check of
the property every case must hold:

    the command exits 0, or prints exactly one `error: ...` line (its last) and exits 2;
    never a traceback, never a hang, never a run folder left by a failed `train`.

Cases run in-process through `deltatune.cli.main` on tiny randomly initialised models whose
loading is cached (each case gets a deep copy), so thousands of cases take minutes. Used by
tests/test_fuzz.py (a few hundred cases in CI) and benchmarks/fuzz.py (the 10,000-case run).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import re
import shutil
import signal
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

WORDS = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(120)]
CASE_SECONDS = 60
# Settings that keep every training case to one tiny step.
FAST = ["--max-steps", "1", "--batch-size", "4", "--max-length", "16", "--threads", "1",
        "--no-progress", "--no-baseline", "--eval-limit", "8"]
UNICODE_BITS = ["\x00", "\u202e", "\u200f", "\ufeff", "😀", "\u0301", "\r", "\x1b[31m", "\\",
                "\"", "'", "\t", "\u2028", "ﬁ", "\x7f", "𝕏" * 3]
ODD_LABELS: list[Any] = [1000000000, 50000, -1, 3.5, 1.0, "", " ", "junk", "10", True, None,
                         [1], {"a": 1}, "0x1", "1e3", "٣", "NaN", 2 ** 70]


@dataclass
class Outcome:
    kind: str          # which generator made the case
    code: int | None   # exit code (None when an exception escaped)
    stderr: str
    stdout: str
    problem: str | None = None  # the property it broke, if any
    signature: str = ""         # the error's shape, for counting by kind


@dataclass
class World:
    """Tiny model folders, a finished run of each task to tamper with, and a cache of loaded
    models, under `root`."""
    root: Path
    bert: Path = field(init=False)
    llama: Path = field(init=False)
    runs: dict[str, Path] = field(default_factory=dict)

    def build(self) -> "World":
        from tests.conftest import tiny_bert, tiny_llama
        from tests.models.test_loading import bert_tokenizer, llama_tokenizer

        self.root.mkdir(parents=True, exist_ok=True)
        self.bert, self.llama = self.root / "tiny-bert", self.root / "tiny-llama"
        tiny_bert(num_labels=2).bert.save_pretrained(self.bert)
        bert_tokenizer(self.root).save_pretrained(self.bert)
        tiny_llama().save_pretrained(self.llama)
        llama_tokenizer().save_pretrained(self.llama)
        return self

    def finished_runs(self, run: Callable[[list[str]], Outcome]) -> None:
        """One good run per task, made once, copied and damaged by the tampering cases."""
        train = self.root / "good.tsv"
        write_rows_tsv(train, good_rows(random.Random(0), 40))
        instructions = self.root / "good.jsonl"
        instructions.write_text("".join(json.dumps(r) + "\n"
                                        for r in good_instructions(random.Random(0), 24)))
        for name, argv in {
            "classification": ["train", "--model", str(self.bert), "--task", "classification",
                               "--train", str(train), "-o", "r=2", "-o", "targets=query,value"],
            "causal-lm": ["train", "--model", str(self.llama), "--task", "causal-lm",
                          "--train", str(instructions), "--template", "alpaca", "-o", "r=2",
                          "--max-new-tokens", "2"],
        }.items():
            path = self.root / "runs" / name
            outcome = run([*argv, *FAST, "--output-dir", str(path)])
            if outcome.code != 0:
                raise RuntimeError(f"the fuzz world's {name} run failed: {outcome.stderr}")
            self.runs[name] = path


@contextlib.contextmanager
def cached_model_loading():
    """Loads each (model, head) once; every case trains its own deep copy."""
    from deltatune.jobs import inference, preparation

    cache: dict[tuple, Any] = {}
    originals = {module: module.load_model for module in (preparation, inference)
                 if hasattr(module, "load_model")}

    def load(original):
        def cached(name, **kwargs):
            key = (str(name), *sorted((k, repr(v)) for k, v in kwargs.items()))
            if key not in cache:
                cache[key] = original(name, **kwargs)
            return copy.deepcopy(cache[key])
        return cached

    for module, original in originals.items():
        module.load_model = load(original)
    try:
        yield
    finally:
        for module, original in originals.items():
            module.load_model = original


class _Hang(Exception):
    pass


def run_cli(argv: list[str], kind: str = "", seconds: int = CASE_SECONDS) -> Outcome:
    """Runs `deltatune ARGV` in this process and checks the property."""
    from deltatune.cli import main

    out, err = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    escaped = None
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    except _Hang:
        code, escaped = None, "hang"
    except BaseException:  # the property: nothing escapes the command
        code, escaped = None, traceback.format_exc(limit=-3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(threads)
    outcome = Outcome(kind, code, err.getvalue(), out.getvalue())
    outcome.problem = _problem(outcome, escaped)
    outcome.signature = _signature(outcome)
    return outcome


def _problem(outcome: Outcome, escaped: str | None) -> str | None:
    if escaped == "hang":
        return "hang"
    if escaped is not None:
        lines = escaped.strip().splitlines()
        where = [line.strip() for line in lines if line.strip().startswith("File ")]
        return f"traceback: {lines[-1]} ({where[-1] if where else '?'})"
    if outcome.code == 0:
        return _invalid_json(outcome.stdout)
    if outcome.code != 2:
        return f"exit code {outcome.code}"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
    if len(errors) != 1 or not lines or errors[0] != lines[-1]:
        return "not exactly one final error line: " + " | ".join(lines[-3:])
    if "Traceback" in outcome.stderr:
        return "traceback printed"
    return None


def _invalid_json(stdout: str) -> str | None:
    """stdout of eval/train is JSON; NaN and Infinity are not JSON."""
    text = stdout.strip()
    if not text.startswith(("{", "[")):
        return None

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError as error:
        return f"stdout is not valid JSON ({error})"
    return None


def _signature(outcome: Outcome) -> str:
    if outcome.code == 0:
        return "ok"
    if outcome.problem:
        return "PROBLEM"
    line = [line for line in outcome.stderr.splitlines() if line.strip()][-1]
    if ": error:" in line and not line.startswith("error:"):
        return "argparse: " + re.sub(r"'[^']*'|\S*[/\\]\S*|\d+", "#", line.split(": error:")[1])[:50]
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*|-?\d[\d.,e+-]*", "#", line[len("error: "):])
    return " ".join(text.split()[:7])


# -- generators ------------------------------------------------------------------------------

def good_rows(rng: random.Random, count: int) -> list[list[str]]:
    return [[" ".join(rng.choices(WORDS, k=rng.randint(1, 6))), rng.choice(["pos", "neg"])]
            for _ in range(count)]


def good_instructions(rng: random.Random, count: int) -> list[dict]:
    return [{"instruction": " ".join(rng.choices(WORDS, k=4)),
             "output": " ".join(rng.choices(WORDS, k=3))} for _ in range(count)]


def write_rows_tsv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    lines = ["\t".join(header or ["text", "label"])] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _odd_text(rng: random.Random) -> str:
    parts = rng.choices(WORDS + UNICODE_BITS, k=rng.randint(0, 8))
    if rng.random() < 0.05:
        parts.append("x" * rng.choice([10_000, 200_000]))
    return " ".join(parts)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        position = rng.randint(0, len(data))
        if choice < 0.3:
            data[position:position] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9)))
        elif choice < 0.45:
            data[position:position] = "\ud800".encode("utf-8", "surrogatepass")
        elif choice < 0.6 and data:
            del data[position:position + rng.randint(1, 40)]
        elif choice < 0.75:
            data[position:position] = rng.choice([b"\t", b",", b"\n", b"\r\n", b"\"", b"\x00"])
        else:
            data = data[:position]
    return bytes(data)


def classification_file(rng: random.Random, folder: Path) -> Path:
    rows = good_rows(rng, rng.choice([0, 1, 3, 8, 20, 40]))
    for row in rows:
        if rng.random() < 0.1:
            row[0] = _odd_text(rng)
        if rng.random() < 0.08:
            row[1] = str(rng.choice(ODD_LABELS))
        if rng.random() < 0.05:
            row.append(rng.choice(WORDS)) if rng.random() < 0.5 else row.pop()
    fmt = rng.choice(["tsv", "csv", "jsonl", "json", "txt", ""])
    header = rng.choice([["text", "label"], ["text", "label"], ["sentence", "label"],
                         ["text"], ["label", "text"], ["text", "text"], []])
    path = folder / (f"train.{fmt}" if fmt else "train")
    if fmt in ("tsv", "csv", "txt", ""):
        sep = "\t" if fmt != "csv" else ","
        lines = [sep.join(header)] + [sep.join(row) for row in rows]
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    else:
        records = [_json_record(rng, row, header) for row in rows]
        if fmt == "json":
            shape = rng.random()
            payload: Any = records if shape < 0.6 else {"data": records} if shape < 0.8 \
                else rng.choice([None, 3, "text", [[1, 2]], {}])
            data = json.dumps(payload).encode()
        else:
            data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if rng.random() < 0.3:
        data = _mutate_bytes(rng, data)
    path.write_bytes(data)
    return path


def _json_record(rng: random.Random, row: list[str], header: list[str]) -> Any:
    if rng.random() < 0.04:
        return rng.choice([None, 1, "row", [row]])
    record: dict[str, Any] = dict(zip(header or ["text", "label"], row))
    if rng.random() < 0.1:
        record[rng.choice(["text", "label"])] = rng.choice(ODD_LABELS)
    return record


def instruction_file(rng: random.Random, folder: Path) -> Path:
    records: list[Any] = good_instructions(rng, rng.choice([0, 1, 5, 16]))
    for record in records:
        if rng.random() < 0.15:
            record[rng.choice(["instruction", "output", "input", "extra"])] = \
                rng.choice([_odd_text(rng), None, 7, [1], {"x": 1}, ""])
        if rng.random() < 0.05:
            del record[rng.choice(list(record))]
    path = folder / rng.choice(["train.jsonl", "train.json"])
    data = (json.dumps(records) if path.suffix == ".json"
            else "".join(json.dumps(r) + "\n" for r in records)).encode()
    if rng.random() < 0.3:
        data = _mutate_bytes(rng, data)
    path.write_bytes(data)
    return path


CONFIG_VALUES: list[Any] = [0, -1, 1, 2, 0.5, 1e9, -1e-9, "x", "", None, True, [], {}, [1, "a"],
                            float("nan"), "1e-3", 10 ** 12]
CONFIG_KEYS = {
    "": ["model", "method", "task", "seed", "output_dir", "progress", "junk"],
    "data": ["train", "eval", "builtin", "max_length", "eval_fraction", "train_limit",
             "label_names", "columns", "template", "junk"],
    "train": ["learning_rate", "epochs", "max_steps", "batch_size", "gradient_accumulation",
              "grad_clip", "schedule", "warmup_ratio", "eval_every", "save_every", "threads",
              "allocator", "early_stopping_patience", "junk"],
    "eval": ["batch_size", "max_new_tokens", "metric", "baseline"],
    "method_options": ["r", "alpha", "dropout", "targets", "use_dora", "num_virtual_tokens"],
}


def yaml_config(rng: random.Random, folder: Path, world: World) -> Path:
    import yaml

    config: dict[str, Any] = {"model": str(world.bert), "task": "classification",
                              "data": {"train": str(classification_file(rng, folder))},
                              "method_options": {"r": 2, "targets": ["query", "value"]}}
    for _ in range(rng.randint(1, 4)):
        section = rng.choice(list(CONFIG_KEYS))
        key = rng.choice(CONFIG_KEYS[section])
        target = config if not section else config.setdefault(section, {})
        if not isinstance(target, dict):
            continue
        target[key] = rng.choice(CONFIG_VALUES)
    path = folder / "run.yaml"
    text = yaml.safe_dump(config) if rng.random() < 0.85 else \
        rng.choice(["", "- a\n- b\n", "a: [\n", "train: 3\n", ":\n", "\t- x", "!!python/object:os.system {}"])
    path.write_text(text, encoding="utf-8")
    return path


OPTION_KEYS = ["r", "alpha", "dropout", "targets", "use_dora", "use_rslora", "num_virtual_tokens",
               "bottleneck_size", "init", "init_text", "layers", "junk", ""]
OPTION_VALUES = ["0", "-2", "2", "1e9", "x", "", "[]", "{}", "query", "all-linear", "nope*",
                 "true", "null", "[query, value]", "3.5", "'", "{a: 1}"]


def method_options(rng: random.Random) -> list[str]:
    method = rng.choice(["lora", "lora", "ia3", "adapter", "prefix", "prompt", "ptuning",
                         "freeze", "full", "textual-inversion", "hyperlora", "nope", ""])
    argv = ["--method", method]
    for _ in range(rng.randint(0, 3)):
        argv += ["-o", rng.choice([f"{rng.choice(OPTION_KEYS)}={rng.choice(OPTION_VALUES)}",
                                   "novalue", "=3", "r==2"])]
    return argv


RUN_FILES = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml",
             "labels.json", "adapter/tokenizer_config.json", "summary.json"]


def tampered_run(rng: random.Random, folder: Path, world: World) -> Path:
    name = rng.choice(sorted(world.runs))
    run = folder / "run"
    shutil.copytree(world.runs[name], run)
    target = run / rng.choice(RUN_FILES)
    damage = rng.choice(["truncate", "empty", "garbage", "delete", "json-list", "bytes",
                         "nan", "int-dtype", "unknown-key"])
    if not target.exists():
        damage = "delete"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[:rng.randint(0, max(len(data) - 1, 0))])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "garbage":
        target.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))))
    elif damage == "delete":
        target.unlink(missing_ok=True)
    elif damage == "json-list":
        target.write_text("[1, 2]")
    elif damage == "bytes":
        target.write_bytes(_mutate_bytes(rng, target.read_bytes()))
    elif damage in ("nan", "int-dtype"):
        _poison_adapter(run / "adapter" / "adapter_model.safetensors", damage, rng)
    elif damage == "unknown-key" and target.suffix in (".json", ".yaml"):
        target.write_text(target.read_text() + ("\njunk_key: 1\n" if target.suffix == ".yaml"
                                                else ""))
    return run


def _poison_adapter(path: Path, damage: str, rng: random.Random) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = rng.choice(sorted(tensors))
    tensors[key] = (tensors[key].fill_(float("nan")) if damage == "nan"
                    else tensors[key].to(torch.int32))
    save_file(tensors, path)


def make_case(rng: random.Random, folder: Path, world: World) -> tuple[str, list[str], Path | None]:
    """(kind, argv, output folder of a train case) for one seeded case."""
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "out"
    kind = rng.choices(["classification-data", "instruction-data", "yaml", "options",
                        "tampered-run", "flags"], weights=[30, 15, 15, 15, 20, 5])[0]
    if kind == "classification-data":
        argv = ["train", "--model", str(world.bert), "--task", "classification",
                "--train", str(classification_file(rng, folder)), "-o", "r=2",
                "-o", "targets=query,value"]
        if rng.random() < 0.3:
            (folder / "eval").mkdir()
            argv += ["--eval", str(classification_file(rng, folder / "eval"))]
        if rng.random() < 0.2:
            argv += ["--label-names", rng.choice(["a,b", "pos,neg", "pos,pos", ",", "x"])]
    elif kind == "instruction-data":
        argv = ["train", "--model", str(world.llama), "--task", "causal-lm",
                "--train", str(instruction_file(rng, folder)), "-o", "r=2",
                "--max-new-tokens", "2", "--template", rng.choice(["alpaca", "none", "chat"])]
    elif kind == "yaml":
        argv = ["train", "--config", str(yaml_config(rng, folder, world))]
    elif kind == "options":
        argv = ["train", "--model", str(world.bert), "--task", "classification",
                "--train", str(world.root / "good.tsv"), *method_options(rng)]
    elif kind == "tampered-run":
        run = tampered_run(rng, folder, world)
        argv = rng.choice([["eval", "--run", str(run), "--no-progress"],
                           ["generate", "--run", str(run), "hello", "--max-new-tokens", "2"]])
        return kind, argv, None
    else:
        argv = ["train", "--model", rng.choice([str(world.bert), str(folder / "absent"), "",
                                                "../../etc", "hf:"]),
                "--task", "classification", "--train", str(world.root / "good.tsv"),
                rng.choice(["--lr", "--epochs", "--batch-size", "--max-length", "--grad-accum",
                            "--eval-fraction", "--warmup-ratio", "--train-limit"]),
                rng.choice(["0", "-1", "nan", "inf", "1e30", "x", "0.5"])]
    return kind, [*argv, *FAST, "--output-dir", str(output)], output


def run_fuzz(cases: int, seed: int, root: Path,
             progress: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Runs `cases` seeded cases under `root`; every Outcome has `problem` None when the
    property held (a leftover run folder of a failed train case is a problem too)."""
    world = World(root / "world").build()
    outcomes = []
    with cached_model_loading():
        world.finished_runs(lambda argv: run_cli(argv, "setup"))
        for index in range(cases):
            rng = random.Random(f"{seed}-{index}")
            folder = root / "cases" / str(index)
            kind, argv, output = make_case(rng, folder, world)
            outcome = run_cli(argv, kind)
            if outcome.problem is None and outcome.code != 0 and output is not None \
                    and output.exists():
                outcome.problem = "run folder left by a failed run"
            if outcome.problem:
                outcome.problem += f" [case {index}: {' '.join(argv)[:300]}]"
            outcomes.append(outcome)
            shutil.rmtree(folder, ignore_errors=True)
            if progress:
                progress(index, outcome)
    return outcomes


def tally(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by generator, by exit and by error kind; the problems found."""
    return {"cases": len(outcomes),
            "by_generator": dict(Counter(o.kind for o in outcomes)),
            "exit_0": sum(o.code == 0 for o in outcomes),
            "exit_2": sum(o.code == 2 for o in outcomes),
            "problems": [o.problem for o in outcomes if o.problem],
            "by_error_kind": dict(Counter(o.signature for o in outcomes).most_common())}

