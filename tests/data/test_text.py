"""Plain-text blocks for language-model adaptation: documents joined by EOS and cut into blocks,
every token labelled."""
from __future__ import annotations

import pytest

from deltatune.data.text import build_text_blocks
from deltatune.errors import ConfigError


def test_blocks_join_documents_with_eos(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    records = [{"text": "The first document."}, {"text": "A second, longer document here."}]
    stream = []
    for record in records:
        stream += tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
    for max_length in (4, 5, 64):
        blocks = build_text_blocks(records, tokenizer, max_length=max_length)
        joined = [token for block in blocks for token in block["input_ids"]]
        # Only a one-token tail (nothing to predict) may be left out.
        assert joined == stream[:len(joined)] and len(stream) - len(joined) <= 1
        assert all(len(block["input_ids"]) == max_length for block in blocks[:-1])
    blocks = build_text_blocks(records, tokenizer, max_length=4)
    assert all(block["labels"] == block["input_ids"] for block in blocks)
    assert tokenizer.decode(stream) == \
        "The first document.<|im_end|>A second, longer document here.<|im_end|>"


def test_one_token_tail_is_dropped(smollm2_tokenizer):
    record = {"text": "hello world"}  # two tokens + EOS = 3 tokens
    blocks = build_text_blocks([record], smollm2_tokenizer, max_length=2)
    assert [len(block["input_ids"]) for block in blocks] == [2]


def test_max_length_too_small(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="at least 2"):
        build_text_blocks([{"text": "x"}], smollm2_tokenizer, max_length=1)
