"""Plain text for language-model adaptation (continued pre-training): documents are tokenized,
joined with EOS so the model sees where one ends, and cut into blocks of `max_length` tokens whose
labels are their own input ids (every token has loss). The last, shorter block is kept so small
evaluation sets lose nothing.
"""
from __future__ import annotations

from typing import Any

from deltatune.errors import ConfigError

ENCODE_CHUNK = 1000


def build_text_blocks(records: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """Blocks {input_ids, labels} from records with a `text` field."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents; set "
                          "tokenizer.eos_token")
    stream: list[int] = []
    for start in range(0, len(records), ENCODE_CHUNK):
        texts = [str(record["text"]) for record in records[start:start + ENCODE_CHUNK]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += list(ids) + [eos]
    blocks = []
    for start in range(0, len(stream), max_length):
        block = stream[start:start + max_length]
        # A one-token block has nothing to predict after the shift.
        if len(block) >= 2:
            blocks.append({"input_ids": block, "labels": list(block)})
    return blocks
