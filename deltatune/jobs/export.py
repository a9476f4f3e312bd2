"""`deltatune export --merge`: a trained run (or a base model plus an adapter folder) becomes a
plain transformers model folder with the adapter folded into the weights, and optionally a GGUF
file for llama.cpp. Nothing is trusted: the logits of the unmerged model on a fixed check input
are computed first, the merged folder is read back with `transformers.AutoModelFor...` and must
give the same logits (within 1e-4 of the logit scale), and a GGUF file is read back and its
logit / cross-entropy change reported. Everything is built in a temporary folder next to `--out`
and renamed into place at the end, so `--out` holds a complete, checked export or nothing new.
`ExportRequest` is a plain dataclass; the CLI (`deltatune/cli_export.py`) fills it from flags.
"""
from __future__ import annotations

import importlib
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from deltatune.errors import ConfigError, DataError, DeltatuneError, MergeNotSupportedError
from deltatune.fileio import checked_output_folder, move_folder_into_place, write_json
from deltatune.jobs.inference import load_for_inference
from deltatune.methods import config_class, method_names
from deltatune.methods.base import MethodHandle, replace_module
from deltatune.models.gguf_export import (FILE_TYPES, check_architecture, compare_gguf,
                                          sequence_logits, tokenizer_vocabulary, write_gguf)
from deltatune.models.loading import CACHE_META, write_model_folder
from deltatune.quant.tensor import QuantizedTensor

REPORT_FILE = "export_report.json"
# The merged model must reproduce the unmerged logits to this fraction of their largest
# magnitude (fp32 merging moves them ~1e-6 relative; a lost or doubled delta moves them ~1e-1).
MERGE_TOLERANCE = 1e-4
# A GGUF file whose next-token cross-entropy on the check input rises more than this (nats) is
# refused as broken rather than lossy. Measured on SmolLM2-135M, 2000 WikiText-2 tokens
# (docs/export.md): f16 -0.0002, q8_0 +0.0002, q4_0 +0.17; the limits leave room for other
# models and texts, and a wrong conversion (e.g. unpermuted q/k) costs several nats.
GGUF_CE_LIMITS = {"f16": 0.01, "q8_0": 0.05, "q4_0": 1.0}
# Not measured here: bf16 keeps 8 significant bits (~4e-3 per rounding), fp16 11.
HALF_PRECISION_TOLERANCES = {torch.bfloat16: 3e-2, torch.float16: 1e-2}
DEFAULT_CHECK_TOKENS = 512
_CHECK_CHUNK = 512
# The fixed check input: real-looking text of several kinds, each run alone (no padding).
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France, and the Eiffel Tower was finished in 1889.",
    "To make a cup of tea, boil water, pour it over the leaves and wait three minutes.",
    "def add(a, b):\n    return a + b\n",
    "Question: What is the largest planet in the solar system? Answer: Jupiter.",
)
_AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM,
                 "classification": AutoModelForSequenceClassification}


class ExportError(DeltatuneError):
    """The export cannot be made as asked (output folder, unwrapping, a check that failed)."""


class ExportCheckError(ExportError):
    """A written model does not reproduce the model it was made from."""


@dataclass
class ExportRequest:
    """Merge `run` (a run directory) or `model` + `adapter` into `out`. `task` is only needed
    with `model` + `adapter` for a classification adapter. `gguf` adds a GGUF file of that type
    ("f16", "q8_0" or "q4_0"). `check_file` replaces the built-in check sentences with the
    first `check_tokens` tokens of a text file."""
    out: str
    run: str | None = None
    model: str | None = None
    adapter: str | None = None
    task: str | None = None
    gguf: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    check_file: str | None = None
    check_tokens: int = DEFAULT_CHECK_TOKENS
    progress: bool = True


def export_merged(request: ExportRequest) -> dict[str, Any]:
    """Loads, checks, merges, writes, reads back and checks again; returns the report (also
    written as `export_report.json` in the folder)."""
    out = _checked_out(request)
    _stage(request, f"loading {request.run or request.model} "
                    f"{'(run adapter)' if request.run else f'+ {request.adapter}'}")
    loaded, handle, _ = load_for_inference(request.model, request.adapter, request.run,
                                           request.task or "causal-lm",
                                           request.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    _require_mergeable(handle)
    if request.gguf:
        check_architecture(model)
        tokenizer_vocabulary(tokenizer, model.get_input_embeddings().weight.shape[0])
    sequences = check_sequences(tokenizer, request, _max_positions(model))
    unmerged = sequence_logits(model, sequences)
    tolerance = reference_tolerance(model)

    _stage(request, f"merging {handle.config.method_name}")
    quantized_layers = _quantized_layers(model)
    densify_weights(model)
    handle.merge()
    unwrap_merged(model, handle)
    sync_config(model)
    check_plain_tree(model)
    requantization = requantization_error(quantized_layers)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    try:
        folder = staging / out.name
        _stage(request, f"writing {out}")
        write_model_folder(model, tokenizer, folder)
        (folder / CACHE_META).unlink(missing_ok=True)  # a cache marker; an export has a report
        _stage(request, "checking the written folder with transformers")
        reloaded = _reload(folder, loaded.task, request.trust_remote_code)
        report = {**_source(request, loaded, handle), "task": loaded.task, "out": str(out),
                  "parameters": _parameter_count(reloaded),
                  "check": _check_description(request, sequences),
                  **merge_check(unmerged, sequence_logits(reloaded, sequences), tolerance)}
        if requantization is not None:
            report["requantization"] = requantization
        report["model_bytes"] = _folder_bytes(folder)
        if request.gguf:
            report["gguf"] = _export_gguf(request, reloaded, tokenizer, folder, sequences)
        report["bytes"] = _folder_bytes(folder)
        write_json(folder / REPORT_FILE, report)
        move_folder_into_place(folder, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _stage(request, f"done: {out} ({report['bytes'] / 1e6:.1f} MB, max logit diff "
                    f"{report['max_logit_diff']:.2e})")
    return report


# -- where the export goes ---------------------------------------------------------------------

def _checked_out(request: ExportRequest) -> Path:
    """The output folder, refused when it would lose data: an existing non-empty folder
    without `overwrite`, a file, or (with `overwrite`) a folder holding the export's source."""
    if not request.out:
        raise ConfigError("say where the export goes: --out DIR")
    if request.gguf is not None and request.gguf not in FILE_TYPES:
        raise ConfigError(f"unknown GGUF type {request.gguf!r}; use one of {', '.join(FILE_TYPES)}")
    if request.check_tokens < 2:
        raise ConfigError(f"--check-tokens must be at least 2, got {request.check_tokens}")
    return checked_output_folder(request.out, request.overwrite,
                                 (request.run, request.adapter, request.model),
                                 "the export's own source")


def _stage(request: ExportRequest, text: str) -> None:
    if request.progress:
        print(f"export: {text}", file=sys.stderr, flush=True)


# -- merging ---------------------------------------------------------------------------------

def mergeable_methods() -> list[str]:
    """The registered methods whose handle can fold its change into the weights: those whose
    handle class overrides `MethodHandle.can_merge` (found in each method's own module)."""
    names = []
    for name in method_names():
        module = importlib.import_module(config_class(name).__module__)
        handles = [value for value in vars(module).values()
                   if isinstance(value, type) and issubclass(value, MethodHandle)
                   and value.__module__ == module.__name__]
        if any(cls.can_merge is not MethodHandle.can_merge for cls in handles):
            names.append(name)
    return names


def _require_mergeable(handle: MethodHandle | None) -> None:
    if handle is None:
        raise ConfigError("nothing to merge: pass a RUN directory, or --model with --adapter")
    if not handle.can_merge:
        raise MergeNotSupportedError(
            f"method '{handle.config.method_name}' cannot be merged into the base weights; "
            f"methods that can: {', '.join(mergeable_methods())}. Use this adapter unmerged "
            "(deltatune eval/generate --run or --adapter)")


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """Hook for quantized base weights: a tensor with `.dequantize()` (deltatune.quant's
    QuantizedTensor) becomes the dense tensor it stands for, so merging writes W + ΔW into a
    plain weight; a dense tensor comes back unchanged (torch's `dequantize` returns itself)."""
    dequantize = getattr(weight, "dequantize", None)
    return dequantize() if callable(dequantize) else weight


def _quantized_layers(model: nn.Module) -> list[tuple[nn.Module, QuantizedTensor]]:
    """The layers whose weight is quantized, with that packed weight (kept: it is small)."""
    return [(module, module.weight) for module in model.modules()
            if isinstance(module, nn.Linear) and isinstance(module.weight, QuantizedTensor)]


def requantization_error(layers: list[tuple[nn.Module, QuantizedTensor]]
                         ) -> dict[str, Any] | None:
    """What quantizing the merged weights again would cost (a QLoRA user's question: does
    the adapter survive on a quantized merged model?). `weight_relative_error` is
    ||deq(Q(W + dW)) - (W + dW)|| / ||W + dW||; `delta_relative_norm` is ||dW|| / ||W + dW||
    with W the dequantized base: an error much larger than the delta would drown it."""
    if not layers:
        return None
    quant_format = layers[0][1].quant_format
    error = delta = total = 0.0
    with torch.no_grad():
        for module, original in layers:
            merged = module.weight.detach().float()
            again = QuantizedTensor.quantize(merged, quant_format).dequantize(torch.float32)
            error += float((again - merged).pow(2).sum())
            delta += float((merged - original.dequantize(torch.float32)).pow(2).sum())
            total += float(merged.pow(2).sum())
    return {"format": quant_format.name, "layers": len(layers),
            "weight_relative_error": round(math.sqrt(error / total), 6),
            "delta_relative_norm": round(math.sqrt(delta / total), 6)}


def densify_weights(model: nn.Module) -> int:
    """Makes every parameter a dense fp32 one (quantized weights through `_dense`, half-precision
    ones cast up; tied ones stay tied); returns how many were replaced. Merging needs writable
    dense weights, and W + dW is then formed and saved without rounding to the base's format."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in replaced:
                dense = _dense(parameter)
                if dense is parameter and not _needs_fp32(parameter):
                    continue
                replaced[id(parameter)] = nn.Parameter(
                    dense.detach().to(torch.float32).clone(),
                    requires_grad=parameter.requires_grad)
            module._parameters[name] = replaced[id(parameter)]
    return len(replaced)


def _needs_fp32(parameter: torch.Tensor) -> bool:
    return parameter.is_floating_point() and parameter.dtype != torch.float32


def reference_tolerance(model: nn.Module) -> float:
    """The check's tolerance: MERGE_TOLERANCE when the unmerged model computes in fp32; a run
    whose base computes in half precision (base_dtype bf16/fp16) gives reference logits only that
    precise, so the fp32 export is held to that precision instead."""
    dtypes = {parameter.dtype for parameter in model.parameters()
              if parameter.is_floating_point()}
    return max([MERGE_TOLERANCE, *(HALF_PRECISION_TOLERANCES.get(d, 0.0) for d in dtypes)])


def unwrap_merged(model: nn.Module, handle: MethodHandle) -> int:
    """Puts the plain layer back wherever a merged wrapper is still in the tree (a module with a
    `base_layer`): the delta is in the weights, so the wrapper only adds names and overhead.
    Returns how many wrappers were removed; a wrapper that says it is not merged is refused."""
    removed = 0
    while True:
        wrapper = next(((name, module) for name, module in model.named_modules()
                        if name and isinstance(getattr(module, "base_layer", None), nn.Module)),
                       None)
        if wrapper is None:
            return removed
        name, module = wrapper
        if not getattr(module, "merged", handle.merged):
            raise ExportError(f"module {name} is still an unmerged {type(module).__name__} "
                              "wrapper after merge(); this method cannot be exported merged")
        replace_module(model, name, module.base_layer)
        removed += 1


def sync_config(model: nn.Module) -> None:
    """Makes the config say what the merged weights are: an adapter on a tied embedding alone
    (not the head) unties them, and new tokens change the vocabulary size."""
    config = model.config
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(config, "tie_word_embeddings", False) \
            and head.weight is not embeddings.weight:
        config.tie_word_embeddings = False
    rows = embeddings.weight.shape[0]
    if getattr(config, "vocab_size", rows) != rows:
        config.vocab_size = rows


def check_plain_tree(model: nn.Module) -> None:
    """The merged model's tensor names must be exactly those of a fresh model of its class, or
    transformers would load some weights as random ones (it only warns about it)."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected, actual = set(fresh.state_dict()), set(model.state_dict())
    if expected != actual:
        extra, missing = sorted(actual - expected), sorted(expected - actual)
        raise ExportError(f"the merged model is not a plain {type(model).__name__}: extra "
                          f"tensors {extra[:3]}, missing {missing[:3]}; the method left "
                          "modules that transformers cannot load")


def _max_positions(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


# -- checks ----------------------------------------------------------------------------------

def check_sequences(tokenizer: Any, request: ExportRequest, max_positions: int
                    ) -> list[list[int]]:
    """Token ids of the check input, one list per forward: the built-in sentences, or the first
    `check_tokens` tokens of `check_file` in chunks of at most 512."""
    limit = min(_CHECK_CHUNK, max_positions)
    if request.check_file is None:
        sequences = [tokenizer(text)["input_ids"][:limit] for text in CHECK_TEXTS]
        return [ids for ids in sequences if len(ids) >= 2]
    path = Path(request.check_file)
    if not path.is_file():
        raise DataError(f"--check-file {path} does not exist; pass a UTF-8 text file")
    # Reading ~8 characters per wanted token is plenty for any BPE vocabulary.
    with path.open(encoding="utf-8", errors="replace") as handle:
        text = handle.read(request.check_tokens * 8)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:request.check_tokens]
    if len(ids) < 2:
        raise DataError(f"--check-file {path} gives {len(ids)} token(s); it needs text")
    return [ids[start:start + limit] for start in range(0, len(ids), limit)
            if len(ids[start:start + limit]) >= 2]


def merge_check(unmerged: list[torch.Tensor], merged: list[torch.Tensor],
                tolerance: float = MERGE_TOLERANCE) -> dict[str, Any]:
    """The largest logit difference between the unmerged model and the reloaded export,
    refused above `tolerance` times the largest logit magnitude (at least 1)."""
    max_diff = max(float((m - u).abs().max()) for u, m in zip(unmerged, merged))
    scale = max(1.0, max(float(u.abs().max()) for u in unmerged))
    if not max_diff <= tolerance * scale:  # also catches NaN
        raise ExportCheckError(
            f"the exported model does not reproduce the adapter: max logit difference "
            f"{max_diff:.3g} exceeds {tolerance:g} x {scale:.3g}; nothing was written to "
            "--out. Report this with the method and model names")
    return {"max_logit_diff": max_diff, "logit_scale": scale,
            "relative_logit_diff": max_diff / scale, "tolerance": tolerance}


def _reload(folder: Path, task: str, trust_remote_code: bool) -> nn.Module:
    auto_class = _AUTO_CLASSES[task]
    model = auto_class.from_pretrained(str(folder), dtype=torch.float32,
                                       attn_implementation="sdpa",
                                       trust_remote_code=trust_remote_code)
    return model.eval()


def _export_gguf(request: ExportRequest, model: nn.Module, tokenizer: Any, folder: Path,
                 sequences: list[list[int]]) -> dict[str, Any]:
    file_name = f"model-{request.gguf}.gguf"
    _stage(request, f"writing {file_name}")
    written = write_gguf(model, tokenizer, folder / file_name, request.gguf,
                         name=Path(request.out).name)
    _stage(request, f"checking {file_name} with transformers")
    comparison = compare_gguf(model, folder, file_name, sequences)
    limit = GGUF_CE_LIMITS[request.gguf]
    if not comparison["cross_entropy_change"] <= limit:
        raise ExportCheckError(
            f"{file_name} read back raises the cross-entropy on the check input by "
            f"{comparison['cross_entropy_change']:.3g} nats (limit {limit} for "
            f"{request.gguf}); the conversion is broken, nothing was written to --out")
    comparison.setdefault("llama_cpp", "not checked: llama-cpp-python is not installed")
    return {"file": file_name, **{k: v for k, v in written.items() if k != "path"},
            **comparison}


def _source(request: ExportRequest, loaded: Any, handle: MethodHandle) -> dict[str, Any]:
    return {"run": request.run, "base_model": loaded.name, "adapter": request.adapter,
            "method": handle.config.method_name}


def _check_description(request: ExportRequest, sequences: list[list[int]]) -> dict[str, Any]:
    return {"source": request.check_file or "built-in sentences",
            "sequences": len(sequences), "tokens": sum(len(ids) for ids in sequences)}


def _parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
