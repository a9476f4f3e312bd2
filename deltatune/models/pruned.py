"""The structurally pruned model folder: an ordinary model folder (config.json, model.safetensors,
tokenizer, written atomically by `write_model_folder`) plus `deltatune_pruned.json`, which holds
the format version, every layer's shapes (heads, KV heads, head size, FFN width), whether the
config alone rebuilds them, and the history of what was removed.

When every layer has the same shapes and the config can say so (Llama: num_attention_heads,
num_key_value_heads, an explicit head_dim, intermediate_size, num_hidden_layers), transformers'
own `from_pretrained` reads the folder and `describes` answers False, so `load_model` takes its
ordinary path (quantized streaming included). Otherwise (layers of different widths, or BERT
heads, whose size the config derives from hidden_size / num_attention_heads) `describes` is True
and `load_pretrained` builds the model from the config, shrinks it to the recorded shapes and
loads the weights with strict key and shape checks."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import ConfigError
from deltatune.models.structure import (apply_architecture_shapes, architecture_shapes,
                                        pruning_history)

MARKER = "deltatune_pruned.json"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def save_pruned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
                extra_json: dict[str, Any] | None = None) -> None:
    """Writes the pruned model folder at `target` (atomically). `extra_json`: entries whose name
    ends in ".json" become files of that name (name -> JSON content, as in
    `write_model_folder`); any other entry is metadata kept under "extra" in the pruning file
    (e.g. {"source": ..., "pruning": ...})."""
    from deltatune.models.loading import write_model_folder
    extra = dict(extra_json or {})
    if MARKER in extra:
        raise ConfigError(f"extra_json may not replace {MARKER}; give the file another name")
    files = {name: content for name, content in extra.items() if name.endswith(".json")}
    metadata = {name: content for name, content in extra.items() if name not in files}
    marker = {"format": FORMAT_VERSION, "shapes": architecture_shapes(model),
              "config_suffices": config_rebuilds_shapes(model),
              **pruning_history(model), "extra": metadata}
    write_model_folder(model, tokenizer, Path(target), extra_json={**files, MARKER: marker})


def config_rebuilds_shapes(model: PreTrainedModel) -> bool:
    """Whether a model built from `model.config` alone has every tensor shape of `model`
    (checked by building it on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    fresh_shapes = {key: tuple(t.shape) for key, t in fresh.state_dict().items()}
    return fresh_shapes == {key: tuple(t.shape) for key, t in model.state_dict().items()}


def describes(folder: Path) -> bool:
    """True for a pruned folder that transformers cannot load alone (marker present and its
    shapes not rebuilt by the config). An unreadable marker counts as ours, so loading reports
    it instead of silently building the unpruned shapes."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(content, dict) and content.get("config_suffices") is True)


def load_pretrained(folder: Path, model_class: Any, head_kwargs: dict[str, Any],
                    trust_remote_code: bool) -> PreTrainedModel:
    """Builds the model from the folder's config, resizes it to the recorded shapes and loads
    the weights (fp32, SDPA, eval). Every key and shape must match, except a task head being
    replaced (`head_kwargs` given: head tensors outside the base model may differ)."""
    folder = Path(folder)
    marker = read_marker(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                        **head_kwargs)
    model = model_class.from_config(config, attn_implementation="sdpa",
                                    trust_remote_code=trust_remote_code)
    apply_architecture_shapes(model, marker["shapes"])
    _load_weights(model, folder / WEIGHTS, allow_new_head=bool(head_kwargs))
    return model.to(torch.float32).eval()


def read_marker(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MARKER
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({type(error).__name__}); re-save the pruned "
                          "model with save_pruned") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not a format-{FORMAT_VERSION} pruning file; re-save the "
                          "pruned model with this deltatune version's save_pruned")
    return content


def _load_weights(model: PreTrainedModel, path: Path, allow_new_head: bool) -> None:
    from deltatune.models.loading import untied_state_dict
    if not path.is_file():
        raise ConfigError(f"{path} is missing; a pruned folder needs its weights file")
    tensors = load_file(str(path))
    expected = {key: tuple(t.shape) for key, t in untied_state_dict(model).items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    tolerated = (lambda key: allow_new_head and not key.startswith(prefix))
    missing = [k for k in expected if k not in tensors and not tolerated(k)]
    unexpected = [k for k in tensors if k not in expected and not tolerated(k)]
    wrong_shape = [k for k in tensors if k in expected and tuple(tensors[k].shape) != expected[k]
                   and not tolerated(k)]
    if missing or unexpected or wrong_shape:
        raise ConfigError(f"{path} does not fit the pruned architecture (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}); the "
                          "folder is damaged or was edited: re-save it with save_pruned")
    usable = {k: t for k, t in tensors.items() if k in expected
              and tuple(t.shape) == expected[k]}
    model.load_state_dict(usable, strict=False)
    model.tie_weights()
