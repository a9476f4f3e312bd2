"""Shared test fixtures: tiny randomly initialised models (seconds to build and run) of the two
architectures deltatune targets — a Llama decoder and a BERT encoder — plus paths to real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM)

SHARED_DATA = Path(os.environ.get("DELTATUNE_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def tiny_llama(seed: int = 0, vocab_size: int = 128, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tie,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2, vocab_size: int = 128) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                        num_labels=num_labels, attn_implementation="sdpa")
    return BertForSequenceClassification(config).eval()


def random_batch(batch: int = 2, length: int = 10, vocab_size: int = 128, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set DELTATUNE_SHARED_DATA)")
    return SHARED_DATA
