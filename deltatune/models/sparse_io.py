"""deltatune's sparse model folder: a pruned model whose bytes on disk really shrink.

The folder is an ordinary model folder (config.json, tokenizer, generation config,
model.safetensors, written atomically by `write_model_folder`) except that every floating-point
tensor with at least `min_sparsity` zeros is stored as two tensors: `<name>.sparse_mask`, the
keep-bitmask of the flattened (row-major) tensor packed 8 per uint8, most significant bit first
(numpy.packbits' order: element i is bit 7 - i % 8 of byte i // 8, the last byte zero-padded),
and `<name>.sparse_values`, the non-zero values in row-major order in the tensor's own dtype.
`deltatune_sparse.json` (the marker `describes` looks for) records the format version and each
sparse tensor's shape, dtype and non-zero count. Other tensors are stored densely. An fp32
tensor costs 1/32 + (1 - s) of its dense bytes: 17/32 at 50 % (and at 2:4, where 2-bit
positions would cost the same 1 bit per weight), 7.4/32 at 80 %.
`load_model(folder)` recognises the marker and rebuilds the dense weights bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import ConfigError, ModelNotFoundError
from deltatune.models.loading import untied_state_dict, write_model_folder

MARKER = "deltatune_sparse.json"
FORMAT_VERSION = 1
MASK_SUFFIX = ".sparse_mask"
VALUES_SUFFIX = ".sparse_values"


def describes(folder: Path) -> bool:
    return (folder / MARKER).is_file()


# -- saving ------------------------------------------------------------------------------------

def save_sparse(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
                min_sparsity: float = 0.3,
                extra_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes `model` as a sparse folder at `target` (see the module docstring) and returns the
    bytes: per sparse tensor and in total, dense (numel × element size) versus stored, plus the
    size of the written model.safetensors."""
    if not 0.0 < min_sparsity < 1.0:
        raise ConfigError(f"min_sparsity must be in (0, 1), got {min_sparsity}")
    if extra_json and MARKER in extra_json:
        raise ConfigError(f"extra_json may not replace {MARKER}; give the file another name")
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    dense_total = 0
    for name, tensor in untied_state_dict(model).items():
        tensor = tensor.detach().cpu()
        dense_total += _bytes(tensor)
        parts = _sparse_parts(tensor, min_sparsity)
        if parts is None:
            stored[name] = tensor
            continue
        mask, values = parts
        stored[name + MASK_SUFFIX], stored[name + VALUES_SUFFIX] = mask, values
        entries[name] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
                         "nnz": values.numel()}
        layers[name] = {"dense_bytes": _bytes(tensor),
                        "sparse_bytes": _bytes(mask) + _bytes(values),
                        "sparsity": 1.0 - values.numel() / tensor.numel()}
    marker = {"format_version": FORMAT_VERSION, "bit_order": "msb-first",
              "min_sparsity": min_sparsity, "tensors": entries}
    target = Path(target)
    write_model_folder(model, tokenizer, target, tensors=stored,
                       extra_json={**(extra_json or {}), MARKER: marker})
    stored_total = sum(_bytes(tensor) for tensor in stored.values())
    return {"layers": layers, "sparse_tensors": len(entries), "dense_bytes": dense_total,
            "stored_bytes": stored_total, "ratio": stored_total / max(dense_total, 1),
            "file_bytes": (target / "model.safetensors").stat().st_size}


def _sparse_parts(tensor: torch.Tensor, min_sparsity: float
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed mask, values) when the tensor is floating point and sparse enough, else None."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    flat = tensor.reshape(-1)
    keep = flat != 0
    if 1.0 - int(keep.sum()) / flat.numel() < min_sparsity:
        return None
    packed = torch.from_numpy(np.packbits(keep.numpy(), bitorder="big"))
    return packed, flat[keep].clone()


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- loading -----------------------------------------------------------------------------------

def load_pretrained(folder: Path, model_class: Any, head_kwargs: dict[str, Any],
                    trust_remote_code: bool) -> PreTrainedModel:
    """Builds `model_class` from the folder's config (with `head_kwargs`: a new task head) and
    fills it with the dense weights rebuilt from the sparse ones. Every model tensor must come
    from the file except tied ones (re-tied from the config) and, when `head_kwargs` asks for a
    new head, head tensors of another size (which keep their fresh initialisation)."""
    folder = Path(folder)
    marker = _read_marker(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                        **head_kwargs)
    model = model_class.from_config(config, attn_implementation="sdpa", dtype=torch.float32,
                                    trust_remote_code=trust_remote_code)
    state = dense_state(folder, marker)
    _load_strictly(model, state, folder, allow_new_head=bool(head_kwargs))
    return model.eval()


def _read_marker(folder: Path) -> dict[str, Any]:
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        version, tensors = marker["format_version"], marker["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelNotFoundError(f"{path} is damaged ({type(error).__name__}); save the model "
                                 "again with save_sparse") from None
    if version != FORMAT_VERSION:
        raise ModelNotFoundError(f"{path} has sparse format {version}; this deltatune reads "
                                 f"format {FORMAT_VERSION}: save the model again")
    if not isinstance(tensors, dict):
        raise ModelNotFoundError(f"{path} is damaged (tensors is not a mapping); save the model "
                                 "again with save_sparse")
    return marker


def dense_state(folder: Path, marker: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The folder's tensors with every sparse one rebuilt dense."""
    marker = marker if marker is not None else _read_marker(Path(folder))
    stored = load_file(str(Path(folder) / "model.safetensors"))
    state = {}
    for name, entry in marker["tensors"].items():
        mask = stored.pop(name + MASK_SUFFIX, None)
        values = stored.pop(name + VALUES_SUFFIX, None)
        if mask is None or values is None:
            raise ModelNotFoundError(f"{folder}: sparse tensor {name} lacks its mask or values; "
                                     "the folder is incomplete, save it again")
        state[name] = _densify(name, entry, mask, values, folder)
    state.update(stored)
    return state


def _densify(name: str, entry: dict[str, Any], mask: torch.Tensor, values: torch.Tensor,
             folder: Path) -> torch.Tensor:
    shape = tuple(int(size) for size in entry["shape"])
    numel = int(np.prod(shape)) if shape else 1
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel, bitorder="big")
                            .astype(bool))
    kept = int(keep.sum())
    if keep.numel() != numel or kept != values.numel() or kept != int(entry["nnz"]):
        raise ModelNotFoundError(f"{folder}: sparse tensor {name} is damaged (mask and values "
                                 "disagree); save the model again")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[keep] = values
    return dense.reshape(shape)


def _load_strictly(model: PreTrainedModel, state: dict[str, torch.Tensor], folder: Path,
                   allow_new_head: bool) -> None:
    own = model.state_dict()
    mismatched = [key for key, tensor in state.items()
                  if key in own and tuple(own[key].shape) != tuple(tensor.shape)]
    if mismatched and not allow_new_head:
        raise ModelNotFoundError(f"{folder}: tensors {mismatched[:3]} do not fit the model's "
                                 "shapes; the folder's config.json does not match its weights")
    for key in mismatched:
        del state[key]  # a new head of another size replaces the saved one
    result = model.load_state_dict(state, strict=False)
    loaded = {own[key].data_ptr() for key in state if key in own}
    missing = [key for key in result.missing_keys
               if own[key].data_ptr() not in loaded and key not in mismatched]
    if result.unexpected_keys or missing:
        raise ModelNotFoundError(f"{folder} does not fit {type(model).__name__}: missing "
                                 f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}; load "
                                 "it for the task it was saved for")
