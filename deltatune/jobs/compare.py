"""`deltatune compare`: several adaptation methods trained on the same data, seed and settings,
one ordinary run directory each under one comparison directory, then one report (deltatune/
report/render.py) that sets their quality against their cost.

Each variant is the base run config with its method, its method options and its learning rate
put in, written to DIR/configs/NAME.yaml and trained by `deltatune train` itself, in a process
of its own: so every variant is an ordinary run (`deltatune train --config
DIR/configs/NAME.yaml` reproduces it) and its peak memory is its own, not the highest of every
variant trained before it in the same process. The comparison is resumable: a variant whose run
directory holds a finished run with the same settings is not trained again; an interrupted one
continues from its newest checkpoint (`deltatune train --resume`) or, without one, starts over.

A method's learning rate comes from the variant, else from the base config when the base's
method is the variant's (its `method_options` likewise), else from DEFAULT_LEARNING_RATES —
one learning rate for every method would leave some diverging and others barely moving."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

import yaml

import deltatune
from deltatune.errors import ConfigError, DeltatuneError, TrainingError
from deltatune.fileio import write_json, write_text
from deltatune.methods import method_names
from deltatune.report.comparison import ReportOptions
from deltatune.report.render import ReportFiles, build_report
from deltatune.report.runs import COMPARISON_FILE
from deltatune.spec import (CONFIG_FILE, RunSpec, parse_run_spec, read_config_mapping,
                            read_run_spec)
from deltatune.train.checkpoint import CHECKPOINTS_FOLDER
from deltatune.train.config import TrainConfig

# Peak learning rates (AdamW, linear decay) that train each method well on short runs of
# small and mid-sized models; full fine-tuning needs the smallest, soft prompts the largest.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "full": 5e-5, "freeze": 1e-3, "lora": 1e-3, "qlora": 1e-3, "adapter": 1e-3,
    "hyperlora": 1e-3, "ia3": 1e-2, "prefix": 1e-2, "ptuning": 1e-2, "prompt": 3e-2,
    "textual-inversion": 5e-3,
}
VARIANT_KEYS = ("name", "method", "options", "learning_rate")
_KEY_ALIASES = {"method_options": "options", "lr": "learning_rate"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
EXIT_INTERRUPTED = 130


@dataclass
class Variant:
    """One method to compare: a name (its folder), the method, its options and learning rate
    (None: the base config's when the methods match, else DEFAULT_LEARNING_RATES)."""
    name: str
    method: str
    options: dict[str, Any] | None = None
    learning_rate: float | None = None


@dataclass
class CompareRequest:
    config: str
    variants: list[Variant]
    out: str
    report: ReportOptions = field(default_factory=ReportOptions)
    # Retrain variants whose folders hold runs with other settings (otherwise an error).
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False


@dataclass
class PlannedVariant:
    variant: Variant
    spec: RunSpec
    raw: dict[str, Any]
    config_path: Path
    run_path: Path
    learning_rate_from: str  # "variant", "base config" or "default"
    # "reuse" (finished, same settings), "train", "resume" (checkpoint, same settings),
    # "restart" (replace what the folder holds).
    action: str


@dataclass
class ComparisonResult:
    variants: list[PlannedVariant]
    report: ReportFiles
    trained: list[str]


class ComparisonInterrupted(DeltatuneError):
    """Ctrl-C during a comparison; the message says how to continue."""


# -- variants --------------------------------------------------------------------------------

def variants_from_methods(text: str) -> list[Variant]:
    """`--methods lora,full,adapter`: one variant per method, named after it."""
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not names:
        raise ConfigError("--methods is empty; name the methods to compare, e.g. "
                          "--methods full,lora,adapter,prefix")
    return _checked([Variant(name, name) for name in names])


def read_variants_file(path: str | Path) -> list[Variant]:
    """A YAML list (or `variants:` list) of {name, method, options, learning_rate}."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"variants file '{path}' not found")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        from deltatune.spec import yaml_problem
        raise ConfigError(f"variants file '{path}' is not valid YAML ({yaml_problem(error)})") \
            from None
    if isinstance(raw, dict) and set(raw) == {"variants"}:
        raw = raw["variants"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"variants file '{path}' must hold a non-empty list of variants, e.g. "
                          "- {name: lora-r8, method: lora, options: {r: 8}, learning_rate: 1e-3}")
    return _checked([_variant(entry, index, path) for index, entry in enumerate(raw, 1)])


def _variant(entry: Any, index: int, path: str | Path) -> Variant:
    where = f"variants file '{path}', entry {index}"
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with method (and name, options, "
                          f"learning_rate), got {type(entry).__name__}")
    entry = {_KEY_ALIASES.get(k, k): v for k, v in entry.items()}
    unknown = sorted(set(entry) - set(VARIANT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a variant has "
                          f"{', '.join(VARIANT_KEYS)}")
    method = entry.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: needs a method, one of {', '.join(method_names())}")
    options = entry.get("options")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a mapping such as {{r: 8, alpha: 16}}")
    rate = entry.get("learning_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or rate <= 0):
        raise ConfigError(f"{where}: learning_rate must be a positive number, got {rate!r}")
    return Variant(str(entry.get("name") or method), method, options,
                   float(rate) if rate is not None else None)


def _checked(variants: list[Variant]) -> list[Variant]:
    known = method_names()
    seen: set[str] = set()
    for variant in variants:
        if variant.method not in known:
            raise ConfigError(f"unknown method '{variant.method}'; choose from {', '.join(known)}")
        if not _SAFE_NAME.fullmatch(variant.name) or ".." in variant.name:
            raise ConfigError(f"variant name '{variant.name}' must be a folder name of letters, "
                              "digits, '.', '_' and '-'")
        if variant.name in seen:
            raise ConfigError(f"variant name '{variant.name}' appears twice; give each variant "
                              "its own name")
        seen.add(variant.name)
    return variants


# -- planning --------------------------------------------------------------------------------

def plan_comparison(request: CompareRequest) -> list[PlannedVariant]:
    """Every variant's spec and what to do with its folder, checked before anything trains."""
    if not request.variants:
        raise ConfigError("nothing to compare: give --methods or --variants")
    base = _read_base(request.config)
    out = Path(request.out)
    for folder in [out, *out.parents]:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out}: {folder} is a file, not a folder; choose another "
                              "--out")
    planned = []
    for variant in request.variants:
        raw, rate_from = _variant_config(base, variant, out, request.progress)
        try:
            spec = parse_run_spec(raw)
        except ConfigError as error:
            raise ConfigError(f"variant {variant.name}: {error}") from None
        run_path = Path(raw["output_dir"])
        planned.append(PlannedVariant(variant, spec, raw, out / "configs" / f"{variant.name}.yaml",
                                      run_path, rate_from, _action(spec, run_path, variant.name,
                                                                   request.overwrite)))
    return planned


def _read_base(path: str) -> dict[str, Any]:
    return read_config_mapping(path, "base config", "give the YAML run config every variant "
                               "shares (see examples/)")


def _variant_config(base: dict[str, Any], variant: Variant, out: Path,
                    progress: bool) -> tuple[dict[str, Any], str]:
    raw = {k: v for k, v in base.items() if k not in ("method", "method_options", "output_dir")}
    same_method = base.get("method", RunSpec.model_fields["method"].default) == variant.method
    raw["method"] = variant.method
    options = variant.options if variant.options is not None else \
        (base.get("method_options") or {}) if same_method else {}
    if options:
        raw["method_options"] = dict(options)
    train = dict(base.get("train") or {})
    base_rate = train.get("learning_rate")
    if variant.learning_rate is not None:
        rate, source = variant.learning_rate, "variant"
    elif same_method and base_rate is not None:
        rate, source = base_rate, "base config"
    else:
        rate = DEFAULT_LEARNING_RATES.get(variant.method, TrainConfig().learning_rate)
        source = "default"
    train["learning_rate"] = rate
    raw["train"] = train
    raw["output_dir"] = str(out / "runs" / variant.name)
    raw["progress"] = progress
    return raw, source


def _action(spec: RunSpec, run_path: Path, name: str, overwrite: bool) -> str:
    if not run_path.is_dir() or not any(run_path.iterdir()):
        return "train"
    if not (run_path / CONFIG_FILE).is_file():
        raise ConfigError(f"variant {name}: {run_path} holds files that are not a deltatune run; "
                          "empty it or choose another --out")
    same = _same_settings(spec, run_path)
    finished = (run_path / "summary.json").is_file()
    if not same and not overwrite:
        state = "a finished" if finished else "an unfinished"
        raise ConfigError(f"variant {name}: {run_path} holds {state} run with other settings; "
                          "pass --overwrite to retrain it, or choose another --out")
    if finished:
        return "reuse" if same else "restart"
    checkpoints = run_path / CHECKPOINTS_FOLDER
    if same and checkpoints.is_dir() and any(checkpoints.iterdir()):
        return "resume"
    return "restart"


def _same_settings(spec: RunSpec, run_path: Path) -> bool:
    try:
        saved = read_run_spec(run_path)
    except ConfigError:
        return False
    ignore = {"progress"}
    return saved.model_dump(exclude=ignore) == spec.model_dump(exclude=ignore)


# -- running ---------------------------------------------------------------------------------

def run_comparison(request: CompareRequest) -> ComparisonResult:
    planned = plan_comparison(request)
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    for item in planned:
        write_text(item.config_path, yaml.safe_dump(item.raw, sort_keys=False))
    _write_manifest(out, request, planned)
    trained = []
    for index, item in enumerate(planned, 1):
        label = f"variant {index}/{len(planned)}: {item.variant.name}"
        if item.action == "reuse":
            print(f"{label}: finished run in {item.run_path}, not retrained", file=sys.stderr,
                  flush=True)
            continue
        print(f"{label} ({item.variant.method}, lr {item.spec.train.learning_rate:g}): "
              f"{item.action} -> {item.run_path}", file=sys.stderr, flush=True)
        train_variant(item, request)
        trained.append(item.variant.name)
        item.action = "reuse"
        _write_manifest(out, request, planned)
    report = build_report([out], out, request.report)
    return ComparisonResult(planned, report, trained)


def train_command(item: PlannedVariant, request: CompareRequest) -> list[str]:
    """The `deltatune train` command line that trains (or resumes) a variant."""
    command = [sys.executable, "-m", "deltatune", "train"]
    if item.action == "resume":
        command += ["--resume", str(item.run_path)] + ([] if request.progress
                                                       else ["--no-progress"])
    else:
        command += ["--config", str(item.config_path)]
        if item.action == "restart":
            command.append("--overwrite")
    if request.trust_remote_code:
        command.append("--trust-remote-code")
    return command


def train_variant(item: PlannedVariant, request: CompareRequest) -> None:
    """Runs `deltatune train` for one variant in its own process and waits for it; Ctrl-C
    reaches that process too, which checkpoints and stops, and then the comparison stops."""
    environment = dict(os.environ)
    package_root = str(Path(deltatune.__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p])
    process = subprocess.Popen(train_command(item, request), env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tails = [_Tee(process.stdout), _Tee(process.stderr)]
    interrupted = False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:
            interrupted = True  # the child got the same Ctrl-C: let it finish its checkpoint
    for tee in tails:
        tee.join()
    name = item.variant.name
    if interrupted or code == EXIT_INTERRUPTED:
        state = "finished" if code == 0 else "stopped"
        raise ComparisonInterrupted(f"comparison interrupted: variant {name} {state}; run the "
                                    "same `deltatune compare` command again to continue")
    if code != 0:
        error = next((line for line in reversed(tails[1].lines()) if line.startswith("error:")),
                     None)
        if error:
            raise DeltatuneError(f"variant {name}: {error[len('error:'):].strip()} (config: "
                                 f"{item.config_path})")
        raise TrainingError(f"variant {name}: `deltatune train` exited with code {code}; its "
                            f"output is above (config: {item.config_path})")


class _Tee:
    """Copies a child's output stream to this process's stderr as it comes and keeps the last
    few kilobytes (the child's error line)."""
    KEEP = 8192

    def __init__(self, stream: IO[bytes]):
        self.stream, self.tail = stream, b""
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while chunk := self.stream.read1(4096) if hasattr(self.stream, "read1") else \
                self.stream.read(4096):
            self.tail = (self.tail + chunk)[-self.KEEP:]
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    def join(self) -> None:
        self.thread.join()

    def lines(self) -> list[str]:
        text = self.tail.decode("utf-8", errors="replace").replace("\r", "\n")
        return [line.strip() for line in text.splitlines() if line.strip()]


def _write_manifest(out: Path, request: CompareRequest, planned: Sequence[PlannedVariant]) -> None:
    """comparison.json: the variants, where their runs are, and the machine they ran on —
    what `deltatune report DIR` reads."""
    write_json(out / COMPARISON_FILE, {
        "base_config": str(request.config), "machine": machine_description(),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "variants": [{"name": p.variant.name, "method": p.variant.method,
                      "options": p.raw.get("method_options") or {},
                      "learning_rate": p.spec.train.learning_rate,
                      "learning_rate_from": p.learning_rate_from,
                      "run": str(p.run_path.relative_to(out)),
                      "config": str(p.config_path.relative_to(out)),
                      "finished": (p.run_path / "summary.json").is_file()}
                     for p in planned]})


def machine_description() -> str:
    """CPU model and core count (and the GPU, when torch sees one)."""
    import torch

    from deltatune.quant.precision import cpu_name
    text = f"{cpu_name()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text
