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
                  pad_token_id: int, repeats: int = 5) -> dict[str, Any]:
    """Parameters (all and non-zero) and the median forward latency on the first `batch_size`
    examples, after one warm-up forward."""
    batch = model_inputs(pad_batch(examples[:batch_size], pad_token_id))
    model.eval()
    model(**batch)
    times = []
    for _ in range(repeats):
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
