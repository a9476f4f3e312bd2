"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, the layout and key names
Hugging Face PEFT reads and writes. Methods PEFT has use its `peft_type`; methods it lacks write
`DELTATUNE_<NAME>` and a `deltatune_method` key so `load_adapter` knows which method to apply.
Loading checks what it reads, since adapter folders are often shared: the config must be a JSON
object, the weights a complete safetensors file of finite floating-point tensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from deltatune.errors import AdapterFormatError
from deltatune.fileio import write_json, write_safetensors
from deltatune.methods import PEFT_TYPE_TO_METHOD, apply, config_class
from deltatune.methods.base import MethodConfig, MethodHandle

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(handle: MethodHandle, directory: str | Path,
                 base_model_name_or_path: str | None = None, tokenizer: Any = None) -> Path:
    """Writes the adapter's config and weights into `directory`; returns the weights path.
    Methods that change the vocabulary (`saves_tokenizer`) also write the tokenizer there."""
    directory = Path(directory)
    if handle.config.saves_tokenizer:
        if tokenizer is None:
            raise AdapterFormatError(f"method '{handle.config.method_name}' adds tokens: pass "
                                     "tokenizer= to save_adapter so they are saved with it")
        tokenizer.save_pretrained(str(directory))
    config = handle.config.adapter_config()
    config["base_model_name_or_path"] = base_model_name_or_path
    state = handle.state_dict()
    if not state:
        raise AdapterFormatError(
            f"method '{handle.config.method_name}' produced no adapter weights to save; "
            "check that its target modules matched the model"
        )
    write_safetensors(directory / WEIGHTS_NAME, state, metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, config)
    return directory / WEIGHTS_NAME


def read_adapter_config(directory: str | Path) -> MethodConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"no {CONFIG_NAME} in '{directory}'; pass the folder that "
                                 "save_adapter or PEFT's save_pretrained wrote")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{path} is not valid JSON ({error}); re-save the adapter or "
                                 "copy the file again") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object (got a {type(raw).__name__}); "
                                 "re-save the adapter with save_adapter or PEFT's "
                                 "save_pretrained")
    method = raw.get("deltatune_method") or PEFT_TYPE_TO_METHOD.get(raw.get("peft_type", ""))
    if method is None:
        raise AdapterFormatError(
            f"{path}: peft_type '{raw.get('peft_type')}' is not supported; supported: "
            f"{sorted(PEFT_TYPE_TO_METHOD)} and deltatune's own methods"
        )
    return config_class(method).from_adapter_config(raw)


def load_adapter(model: nn.Module, directory: str | Path) -> MethodHandle:
    """Applies the saved method to `model` (in place) and loads its weights; returns the handle."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFormatError(f"no {WEIGHTS_NAME} in '{directory}'")
    state = read_adapter_weights(weights)
    handle = apply(model, config)
    handle.load_state_dict(state)
    return handle


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter weights file, refusing a damaged file and values no trained
    adapter has: integer tensors or NaN/inf (which would make every output NaN or empty)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise AdapterFormatError(f"{path} is not a readable safetensors file ({error}); it is "
                                 "empty, truncated or corrupt: copy or save the adapter "
                                 "again") from None
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{path}: tensor '{name}' has dtype {tensor.dtype}; adapter "
                                     "weights are floating point, so the file is not an "
                                     "adapter or was altered: save the adapter again")
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{path}: tensor '{name}' holds NaN or infinite values (a "
                                     "diverged or damaged run); retrain, or load an earlier "
                                     "checkpoint's adapter")
    return state
