"""Whole models with quantized linear layers: quantize in place, load a checkpoint quantizing
layer by layer (so the fp32 model never exists in memory), save and load the packed model, and
dequantize it again.

Which layers: every `nn.Linear` except the output head and task heads (`DEFAULT_SKIP`), as
QLoRA does (the head and the embeddings stay in the base dtype). A quantized layer stays an
`nn.Linear` whose `weight` is a `QuantizedTensor` (quant/tensor.py), so adaptation methods wrap
it like any other linear layer.

On disk (`deltatune.models.save_quantized` writes it from `quantized_state` and `quant_meta`):
`model.safetensors` holds each quantized weight as its packed parts
under `<parameter>.<part>` (e.g. `model.layers.0.mlp.up_proj.weight.codes`) and every other
tensor as is; `deltatune_quant.json` records the format (`QuantFormat.config()`), the quantized
parameter names and the compute dtype; `config.json` and the tokenizer are the model's own.
`load_model(folder)` recognises such a folder and rebuilds the quantized model.
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError, ModelNotFoundError
from deltatune.quant.formats import QuantFormat, get_format
from deltatune.quant.tensor import QuantizedTensor

QUANT_META = "deltatune_quant.json"
QUANT_META_FORMAT = 1
# Output and task heads stay dense, as in QLoRA (and they are often tied to the embeddings).
DEFAULT_SKIP = ("lm_head", "score", "classifier")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass
class QuantizedModelInfo:
    """What `quantize_model` changed: layer count, bytes before (fp32) and after (packed)."""
    quant_format: str
    layers: int
    dense_bytes: int
    packed_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.quant_format, "layers": self.layers,
                "dense_bytes": self.dense_bytes, "packed_bytes": self.packed_bytes}


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP
                        ) -> list[tuple[str, nn.Linear]]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = list(skip)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output and name
            and not any(_is_named(name, pattern) for pattern in skip)]


def _is_named(name: str, pattern: str) -> bool:
    """`pattern` is the module's name or its last components ("lm_head", "mlp.down_proj")."""
    return name == pattern or name.endswith("." + pattern)


def quantize_model(model: nn.Module, quant_format: QuantFormat | str,
                   skip: Iterable[str] = DEFAULT_SKIP) -> QuantizedModelInfo:
    """Replaces, one layer at a time, each quantizable linear weight by its `QuantizedTensor`
    (frozen; computing in the weight's dtype). The dense weight is freed as soon as it is
    packed, so memory falls as the loop goes."""
    fmt = get_format(quant_format) if isinstance(quant_format, str) else quant_format
    layers = quantizable_linears(model, skip)
    dense = packed = 0
    for _, layer in layers:
        weight = layer.weight
        if isinstance(weight, QuantizedTensor):
            raise ConfigError("the model is already quantized; load the dense model to "
                              "quantize it to another format")
        dense += weight.numel() * weight.element_size()
        quantized = QuantizedTensor.quantize(weight, fmt)
        packed += quantized.storage_bytes()
        layer.weight = nn.Parameter(quantized, requires_grad=False)
        del weight
    return QuantizedModelInfo(fmt.name, len(layers), dense, packed)


def dequantize_model(model: nn.Module) -> int:
    """Replaces every quantized weight by a dense frozen parameter in its compute dtype."""
    count = 0
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if isinstance(parameter, QuantizedTensor):
                module._parameters[name] = nn.Parameter(parameter.dequantize(),
                                                        requires_grad=False)
                count += 1
    return count


def quantized_parameters(model: nn.Module) -> dict[str, QuantizedTensor]:
    return {name: p for name, p in model.named_parameters() if isinstance(p, QuantizedTensor)}


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take: packed for quantized weights, each shared
    tensor once."""
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.storage_bytes() if isinstance(tensor, QuantizedTensor) \
            else tensor.numel() * tensor.element_size()
    return total


def quant_format_of(model: nn.Module) -> QuantFormat | None:
    for parameter in model.parameters():
        if isinstance(parameter, QuantizedTensor):
            return parameter.quant_format
    return None


# -- saving ------------------------------------------------------------------------------------

def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flat tensors to save (quantized weights as their parts) and the quantized names. Tied
    tensors are written once (first name wins), as `save_pretrained` does."""
    tensors: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    seen: set[int] = set()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers()):
        if id(tensor) in seen or name in _non_persistent_buffers(model):
            continue
        seen.add(id(tensor))
        if isinstance(tensor, QuantizedTensor):
            quantized.append(name)
            for part, value in tensor.parts.items():
                tensors[f"{name}.{part}"] = value.contiguous()
        else:
            tensors[name] = tensor.detach().contiguous()
    return tensors, quantized


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def quant_meta(model: nn.Module, quantized: list[str]) -> dict[str, Any]:
    fmt = quant_format_of(model)
    if fmt is None:
        raise ConfigError("the model has no quantized weights to save")
    dtypes = {str(p.dtype).removeprefix("torch.") for p in quantized_parameters(model).values()}
    return {"format_version": QUANT_META_FORMAT, "quant_format": fmt.config(),
            "compute_dtype": sorted(dtypes)[0], "quantized": quantized}


def is_quantized_folder(path: Path) -> bool:
    return (Path(path) / QUANT_META).is_file()


# -- loading -----------------------------------------------------------------------------------

@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Builds modules whose parameters live on the meta device (no memory, no init cost) while
    buffers (rotary frequencies, position ids) are real: the checkpoint then fills the
    parameters one at a time."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        original(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            module._parameters[name] = nn.Parameter(parameter.to("meta"),
                                                    requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, read with plain file reads one tensor at a time (an
    mmap of the whole file would count every page read towards resident memory)."""
    with open(path, "rb") as file:
        header_size = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(header_size))
        data_start = 8 + header_size
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ModelNotFoundError(f"{path}: tensor {name} has dtype {entry['dtype']}, "
                                         "which deltatune cannot read")
            begin, end = entry["data_offsets"]
            file.seek(data_start + begin)
            raw = bytearray(file.read(end - begin))
            tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(entry["shape"])


def load_quantized_pretrained(folder: Path, model_class: Any, config: Any,
                              quant_format: QuantFormat | None,
                              skip: Iterable[str] = DEFAULT_SKIP, ignore_mismatched: bool = False,
                              trust_remote_code: bool = False) -> nn.Module:
    """Builds `model_class` from `config` with empty parameters and fills them from `folder`'s
    safetensors one tensor at a time, quantizing each target linear weight as it arrives (or
    taking the packed parts of a folder `save_quantized` wrote). Peak memory: the packed model
    plus one dense tensor. Parameters the checkpoint lacks (a new classification head) are
    initialised as transformers would, and so are those whose shape differs when
    `ignore_mismatched` (a new head of another size replacing a trained one)."""
    files = safetensors_files(folder)
    if not files:
        raise ModelNotFoundError(f"{folder} has no model.safetensors (or sharded index) to "
                                 "quantize while loading")
    meta = _read_quant_meta(folder)
    if meta is not None:
        quant_format = get_format(meta["quant_format"]["name"])
    with parameters_on_meta():
        model = model_class.from_config(config, attn_implementation="sdpa", dtype=torch.float32,
                                        trust_remote_code=trust_remote_code)
    targets = {f"{name}.weight" for name, _ in quantizable_linears(model, skip)}
    prequantized = set(meta["quantized"]) if meta is not None else set()
    parameters = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        for key, tensor in iter_safetensors(path):
            owner = _packed_owner(key, prequantized)
            if owner is not None:
                name = _resolve(owner, parameters, prefix)
                parts = pending.setdefault(name, {})
                parts[key[len(owner) + 1:]] = tensor
                continue
            name = _resolve(key, parameters, prefix)
            if name is None:
                _set_buffer(model, key, tensor, prefix)
                continue
            if name in targets and quant_format is not None:
                value: torch.Tensor = QuantizedTensor.quantize(tensor.float(), quant_format,
                                                              torch.float32)
            else:
                value = tensor.float() if tensor.is_floating_point() else tensor
            _set_parameter(model, name, value, ignore_mismatched)
    for name, parts in pending.items():
        shape = tuple(parameters[name].shape)
        _set_parameter(model, name, QuantizedTensor(parts, quant_format, shape, torch.float32))
    _tie_and_initialise(model)
    return model


def _read_quant_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / QUANT_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["quant_format"]["name"], meta["quantized"]  # noqa: B018 - shape check
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelNotFoundError(f"{path} is damaged ({type(error).__name__}); quantize the "
                                 "model again with `deltatune quantize`") from None
    return meta


def _packed_owner(key: str, prequantized: set[str]) -> str | None:
    owner = key.rsplit(".", 1)[0]
    return owner if owner in prequantized else None


def _resolve(key: str, parameters: dict[str, nn.Parameter], prefix: str) -> str | None:
    """The model's parameter name for a checkpoint key (checkpoints of a bare encoder lack the
    task model's `base_model_prefix`)."""
    if key in parameters:
        return key
    if prefix and f"{prefix}.{key}" in parameters:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in parameters:
        return key[len(prefix) + 1:]
    return None


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor,
                   ignore_mismatched: bool = False) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    expected = module._parameters[leaf]
    if tuple(expected.shape) != tuple(value.shape):
        if ignore_mismatched:
            return  # stays empty and is initialised like a missing parameter
        raise ModelNotFoundError(f"checkpoint tensor {name} has shape {tuple(value.shape)} but "
                                 f"the model expects {tuple(expected.shape)}; the folder's "
                                 "config.json does not match its weights")
    module._parameters[leaf] = nn.Parameter(value, requires_grad=expected.requires_grad
                                            and not isinstance(value, QuantizedTensor))


def _set_buffer(model: nn.Module, key: str, tensor: torch.Tensor, prefix: str) -> None:
    buffers = dict(model.named_buffers())
    name = key if key in buffers else f"{prefix}.{key}" if f"{prefix}.{key}" in buffers else None
    if name is None:
        return  # transformers ignores unexpected keys too (e.g. a pooler the task does not use)
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype)


def _tie_and_initialise(model: nn.Module) -> None:
    model.tie_weights()
    for module in model.modules():
        empty = [name for name, p in module._parameters.items()
                 if p is not None and p.device.type == "meta"]
        if not empty:
            continue
        for name in empty:
            old = module._parameters[name]
            module._parameters[name] = nn.Parameter(torch.empty(old.shape, dtype=torch.float32),
                                                    requires_grad=old.requires_grad)
        model._init_weights(module)
