"""What `deltatune prune` and `deltatune distill` share about their output folder and their
measurements: starting the folder (new, empty, or replaced on --overwrite while keeping caches
a rerun should reuse), fixed padded batches of examples, and the parameter count and forward
latency of a model on one evaluation batch."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from deltatune.data.collate import model_inputs, pad_batch
from deltatune.errors import ConfigError
from deltatune.fileio import append_jsonl, write_json
from deltatune.jobs.summary import rounded


def start_output_folder(out: str | Path, overwrite: bool, config: dict[str, Any],
                        keep: Sequence[str] = ()) -> Path:
    """Creates `out` (refusing a non-empty one unless `overwrite`, which empties it except the
    entries named in `keep`) and writes config.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} already exists and is not empty; choose another "
                              "folder or pass --overwrite")
        for entry in out.iterdir():
            if entry.name in keep:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    return out


def padded_batches(examples: list[dict], batch_size: int, pad_token_id: int
                   ) -> list[dict[str, torch.Tensor]]:
    return [pad_batch(examples[start:start + batch_size], pad_token_id)
            for start in range(0, len(examples), batch_size)]


@torch.inference_mode()
def measure_model(model: nn.Module, examples: list[dict], batch_size: int,
                  pad_token_id: int, repeats: int = 15) -> dict[str, Any]:
    """Parameters (all and non-zero) and the median forward latency on the first `batch_size`
    examples, after one warm-up forward (3 to `repeats` timings, about 10 s at most)."""
    batch = model_inputs(pad_batch(examples[:batch_size], pad_token_id))
    model.eval()
    model(**batch)
    times: list[float] = []
    # Up to `repeats` timings, but at least 3 and no more than ~10 s of them (large models).
    while len(times) < repeats and (len(times) < 3 or sum(times) < 10.0):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    parameters = list({id(p): p for p in model.parameters()}.values())
    return {"parameters": sum(p.numel() for p in parameters),
            "nonzero_parameters": sum(int(p.count_nonzero()) for p in parameters),
            "latency_ms_per_batch": round(statistics.median(times) * 1000, 2),
            "latency_batch": list(batch["input_ids"].shape)}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def log_stage(out: Path, record: dict[str, Any]) -> None:
    append_jsonl(out / "metrics.jsonl", rounded(record))


@torch.inference_mode()
def reload_check(folder: Path, model: nn.Module, examples: list[dict], pad_token_id: int,
                 model_kind: str, generate: bool) -> dict[str, Any]:
    """Loads the saved folder back the way every other command will (`load_model`), compares
    its logits with the in-memory model's on a few examples and, for a language model, greedily
    continues the first one: the compressed model is an ordinary, working model."""
    from deltatune.models import load_model
    loaded = load_model(str(folder), task=model_kind)
    batch = model_inputs(pad_batch(examples[:4], pad_token_id))
    expected = model(**batch).logits
    actual = loaded.model(**batch).logits
    check: dict[str, Any] = {"reload_max_abs_logit_diff": float((expected - actual).abs().max())}
    if generate:
        prompt = list(examples[0].get("prompt_ids") or examples[0]["input_ids"][:16])
        ids = torch.tensor([prompt])
        output = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=16, do_sample=False,
                                       pad_token_id=loaded.tokenizer.pad_token_id)
        check["sample_generation"] = loaded.tokenizer.decode(output[0, ids.shape[1]:],
                                                             skip_special_tokens=True)
    return check


class FolderArtifacts:
    """The one RunDirectory method `Task.save_artifacts` uses, for a plain model folder: so a
    compressed classifier keeps its labels.json beside its weights."""

    def __init__(self, folder: Path):
        self.folder = folder

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.folder / name, data)

