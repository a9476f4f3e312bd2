"""`deltatune quantize`: a model (or a trained run, its adapter merged first) frozen in a number
format and written as a packed folder, with what it cost: bytes on disk against fp32,
perplexity on held-out text before and after (accuracy for a classification run), the weight
reconstruction error and the time per generated token.

The packed folder loads back with `load_model(folder)` (and so with `deltatune eval`,
`generate`, and `train`, which then trains on the frozen quantized base).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.data import build_datasets
from deltatune.errors import ConfigError
from deltatune.eval.evaluate import evaluate_perplexity
from deltatune.fileio import write_json
from deltatune.jobs.inference import finite_or_null
from deltatune.jobs.sources import load_dense_source
from deltatune.jobs.summary import rounded
from deltatune.jobs.tasks import get_task
from deltatune.models import LoadedModel, save_quantized
from deltatune.quant import get_format, model_bytes, quantize_model
from deltatune.quant.kernels import kernel_choices
from deltatune.quant.model import quantizable_linears
from deltatune.quant.precision import cpu_name
from deltatune.spec import RunSpec

REPORT_FILE = "quantize_report.json"
DEFAULT_EVAL_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text" \
    / "wikitext2_test.txt"


@dataclass
class QuantizeRequest:
    source: str                      # a model name, folder or hub id, or a run directory
    quant_format: str
    out: str
    overwrite: bool = False
    eval_text: str | None = None     # plain text for perplexity; default: WikiText-2 test
    eval_tokens: int = 8192
    window: int = 512
    generate_tokens: int = 32
    evaluate: bool = True
    progress: bool = True
    trust_remote_code: bool = False


def quantize_saved(request: QuantizeRequest) -> dict[str, Any]:
    fmt = get_format(request.quant_format)
    out = _checked_output(request)
    loaded, spec = _load_dense(request)
    model = loaded.model
    dense_bytes = _fp32_bytes(model)
    say(f"evaluating the dense model ({_describe_eval(request, spec)})")
    before = _quality(loaded, spec, request)
    before["ms_per_token"] = _ms_per_token(loaded, spec, request)
    say(f"quantizing {len(quantizable_linears(model))} linear layers to {fmt.name}")
    references = _reference_weights(model)
    info = quantize_model(model, fmt)
    error = _reconstruction_error(model, references)
    del references
    say("evaluating the quantized model")
    after = _quality(loaded, spec, request)
    after["ms_per_token"] = _ms_per_token(loaded, spec, request)
    say(f"writing {out}")
    save_quantized(model, loaded.tokenizer, out,
                   meta={"source": request.source, "quant_format": fmt.config()})
    disk = _folder_bytes(out, "model.safetensors")
    report = finite_or_null({
        "source": request.source, "format": fmt.config(), "out": str(out),
        "layers_quantized": info.layers,
        "fp32_bytes": dense_bytes, "bytes_on_disk": disk,
        "size_vs_fp32": round(disk / dense_bytes, 4) if dense_bytes else None,
        "memory_bytes": model_bytes(model),
        "weight_relative_error": round(error, 6),
        "before": rounded(before), "after": rounded(after),
        "kernels": kernel_choices(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
    })
    write_json(out / REPORT_FILE, report)
    return report


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _checked_output(request: QuantizeRequest) -> Path:
    out = Path(request.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not request.overwrite:
        raise ConfigError(f"--out {out} already exists and is not empty; choose another folder "
                          "or pass --overwrite")
    if Path(request.source).resolve() == out.resolve():
        raise ConfigError("--out must differ from the model being quantized")
    return out


def _load_dense(request: QuantizeRequest) -> tuple[LoadedModel, RunSpec | None]:
    """The model to quantize, dense: a run's base with its adapter merged in, or the model."""
    source = load_dense_source(request.source, trust_remote_code=request.trust_remote_code,
                               unwrap=False)
    return source.loaded, source.spec


def _fp32_bytes(model: torch.nn.Module) -> int:
    unique = {id(p): p for p in list(model.parameters()) + list(model.buffers())}
    return sum(p.numel() * 4 if p.is_floating_point() else p.numel() * p.element_size()
               for p in unique.values())


def _reference_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dense weights the error is measured against (kept as bf16 to halve the copy)."""
    return {name: layer.weight.detach().to(torch.bfloat16)
            for name, layer in quantizable_linears(model)}


def _reconstruction_error(model: torch.nn.Module, references: dict[str, torch.Tensor]) -> float:
    """||W - deq(Q(W))|| / ||W|| over all quantized weights together."""
    error = total = 0.0
    for name, layer in quantizable_linears(model):
        reference = references[name].float()
        error += float((layer.weight.dequantize(torch.float32) - reference).pow(2).sum())
        total += float(reference.pow(2).sum())
    return math.sqrt(error / total) if total else 0.0


def _describe_eval(request: QuantizeRequest, spec: RunSpec | None) -> str:
    if not _models_language(spec):
        return "the run's evaluation data"
    return f"perplexity on {request.eval_tokens} tokens of {_eval_text_path(request).name}"


def _quality(loaded: LoadedModel, spec: RunSpec | None, request: QuantizeRequest
             ) -> dict[str, Any]:
    if not request.evaluate:
        return {}
    if not _models_language(spec):
        return _task_metrics(loaded, spec, request)
    return _text_perplexity(loaded, request)


def _models_language(spec: RunSpec | None) -> bool:
    return spec is None or get_task(spec.task).models_language


def _eval_text_path(request: QuantizeRequest) -> Path:
    return Path(request.eval_text) if request.eval_text else DEFAULT_EVAL_TEXT


def _text_perplexity(loaded: LoadedModel, request: QuantizeRequest) -> dict[str, Any]:
    path = _eval_text_path(request)
    if not path.is_file():
        raise ConfigError(f"no evaluation text at {path}; pass --eval-text FILE (plain text) "
                          "or --no-eval")
    ids = _first_tokens(loaded.tokenizer, path, request.eval_tokens)
    windows = [ids[start:start + request.window] for start in range(0, len(ids), request.window)]
    examples = [{"input_ids": w, "labels": w} for w in windows if len(w) > 1]
    metrics = evaluate_perplexity(loaded.model, examples, loaded.tokenizer.pad_token_id,
                                  batch_size=4, show_progress=request.progress)
    return {**metrics, "eval_tokens": sum(len(w) for w in windows)}


def _first_tokens(tokenizer: Any, path: Path, count: int) -> list[int]:
    """The first `count` tokens of a text file, tokenized a line at a time (the whole file at
    once would tokenize far more than is scored)."""
    ids: list[int] = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
            if len(ids) >= count:
                break
    return ids[:count]


def _task_metrics(loaded: LoadedModel, spec: RunSpec, request: QuantizeRequest
                  ) -> dict[str, Any]:
    task = get_task(spec.task)
    data = spec.data
    labels = task.saved_labels(Path(request.source))
    if labels:
        data = dataclasses.replace(data, label_names=labels)
    datasets = build_datasets(data, loaded.tokenizer, task.encoding, spec.seed)
    return task.evaluator(loaded, datasets.eval, datasets.info, spec.eval, request.progress)()


@torch.inference_mode()
def _ms_per_token(loaded: LoadedModel, spec: RunSpec | None, request: QuantizeRequest
                  ) -> float | None:
    """Greedy decoding of `generate_tokens` tokens after a short prompt, batch 1: the
    latency a chat user sees (one token per forward, where packed kernels matter most)."""
    if request.generate_tokens <= 0 or not _models_language(spec):
        return None
    tokenizer = loaded.tokenizer
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    settings = {"attention_mask": torch.ones_like(prompt), "do_sample": False,
                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    loaded.model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, **settings)
    start = time.perf_counter()
    output = loaded.model.generate(input_ids=prompt, max_new_tokens=request.generate_tokens,
                                   min_new_tokens=request.generate_tokens, **settings)
    new_tokens = output.shape[1] - prompt.shape[1]
    return (time.perf_counter() - start) * 1000 / max(new_tokens, 1)


def _folder_bytes(folder: Path, *names: str) -> int:
    return sum((folder / name).stat().st_size for name in names if (folder / name).is_file())
