"""Instruction data for causal-LM fine-tuning: records become token ids with loss on the
response only.

A record is either Alpaca style (`instruction`, optional `input`, `output`, optional `system`)
or a chat (`messages`: [{role, content}], ShareGPT's {from, value} accepted too). Three templates:
`alpaca` ("### Instruction:/### Input:/### Response:" then the output and EOS), `chat` (the
tokenizer's own chat template; every assistant turn and its end-of-turn tokens are trained) and
`none` (instruction and input on lines of their own, then the output and EOS). Token boundaries
are exact: the prompt is tokenized alone and must be a prefix of the tokenized full text; when a
tokenizer merges across the boundary, the pieces are tokenized separately and concatenated (what
generation from the prompt would see) and the fallback is counted.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

from deltatune.data.collate import IGNORE_INDEX
from deltatune.errors import ConfigError, DataError

TEMPLATES = ("alpaca", "chat", "none")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def fill_placeholders(records: list[dict], values: dict[str, str]) -> list[dict]:
    """Returns copies of `records` with `{{key}}` replaced by `values[key]` in every string field
    (chat message contents included); placeholders without a value are left as they are."""
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda match: str(values.get(match.group(1), match.group(0))),
                                   value)
        if isinstance(value, list):
            return [fill(item) for item in value]
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        return value
    return [fill(record) for record in records]


def count_unfilled_placeholders(records: list[dict]) -> int:
    """Number of records that still contain a `{{name}}` placeholder anywhere."""
    return sum(1 for record in records if PLACEHOLDER.search(str(record)))


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def plain_prompt(instruction: str, input_text: str | None = None) -> str:
    return f"{instruction}\n{input_text}\n" if input_text else f"{instruction}\n"


def record_to_messages(record: dict) -> list[dict]:
    """The record as a chat: its `messages`, or an Alpaca record as system?/user/assistant."""
    if record.get("messages") is not None:
        return _normalise_messages(record["messages"])
    instruction, input_text, output = _alpaca_fields(record)
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": user},
                       {"role": "assistant", "content": output}]


def _normalise_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError("`messages` must be a non-empty list of {role, content} objects")
    normalised = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"message {number} is not an object with role and content")
        if "role" in message:
            role, content = message["role"], message.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(message.get("from"), message.get("from")), \
                message.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"message {number} needs a string `role` and `content` "
                            f"(found keys {', '.join(message)})")
        normalised.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in normalised):
        raise DataError("the conversation has no assistant message, so nothing to train on")
    return normalised


def _alpaca_fields(record: dict) -> tuple[str, str | None, str]:
    instruction, output = record.get("instruction"), record.get("output")
    if instruction is None or output is None:
        raise DataError("an instruction record needs `instruction` and `output` fields (or "
                        f"`messages`); it has {', '.join(map(str, record)) or 'no fields'}. Map "
                        "other names with columns: {instruction: ..., output: ...}")
    input_text = record.get("input")
    return str(instruction), (str(input_text) if input_text else None), str(output)


@dataclass
class _Segments:
    """The rendered text cut into pieces, each marked trained or not, plus token ids appended
    after the text (the EOS of the Alpaca template)."""

    text_pieces: list[tuple[str, bool]]
    prefix_ids: list[int]
    suffix_ids: list[int]
    prompt_pieces: int  # how many leading pieces form the generation prompt of the last response
    reference: str


def encode_instruction(record: dict, tokenizer: Any, template: str,
                       max_length: int) -> dict:
    """Token ids of one instruction record: input_ids, labels (-100 on every token without loss),
    prompt_ids (the generation prompt of the last response) and reference (that response's
    text). Truncation keeps the start; labels may then be all -100 (see `has_loss`)."""
    example, _ = _encode(record, tokenizer, template, max_length)
    return example


def render_prompt(prompt: str, tokenizer: Any, template: str,
                  system: str | None = None) -> list[int]:
    """Generation prompt ids for one user message, exactly as training encodes the prompt of an
    instruction record (`system` is used by the chat template only)."""
    record = {"instruction": prompt, "output": "", **({"system": system} if system else {})}
    return encode_instruction(record, tokenizer, template, max_length=sys.maxsize)["prompt_ids"]


def raw_prompt_ids(text: str, tokenizer: Any) -> list[int]:
    """A prompt used as given (no template): the tokenizer's leading special ids, if any, then
    the text's tokens. `render_prompt(p, tokenizer, "none")` is this for `p + "\n"`."""
    return _leading_special_ids(tokenizer) + list(
        tokenizer(text, add_special_tokens=False)["input_ids"])


def has_loss(example: dict) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def encode_instructions(records: list[dict], tokenizer: Any, template: str, max_length: int,
                        source: str = "data") -> tuple[list[dict], dict[str, int]]:
    """Encodes every record; drops those whose response was truncated away. Returns the
    examples and counts: dropped (response fully truncated), truncated (cut but kept) and
    boundary_fallbacks (prompt tokens were not a prefix of the full text's tokens)."""
    counts = {"dropped": 0, "truncated": 0, "boundary_fallbacks": 0}
    examples = []
    for index, record in enumerate(records, start=1):
        try:
            example, stats = _encode(record, tokenizer, template, max_length)
        except DataError as error:
            raise DataError(f"{source} record {index}: {error}") from error
        counts["boundary_fallbacks"] += stats["fallback"]
        if not has_loss(example):
            counts["dropped"] += 1
            continue
        counts["truncated"] += stats["truncated"]
        examples.append(example)
    return examples, counts


def _encode(record: dict, tokenizer: Any, template: str,
            max_length: int) -> tuple[dict, dict[str, int]]:
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    segments = _chat_segments(record, tokenizer) if template == "chat" else \
        _completion_segments(record, tokenizer, template)
    piece_ids, fallback = _tokenize_pieces(tokenizer, [text for text, _ in segments.text_pieces])
    input_ids, labels = list(segments.prefix_ids), [IGNORE_INDEX] * len(segments.prefix_ids)
    for ids, (_, trained) in zip(piece_ids, segments.text_pieces):
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    input_ids += segments.suffix_ids
    labels += segments.suffix_ids
    prompt_ids = list(segments.prefix_ids)
    for ids in piece_ids[:segments.prompt_pieces]:
        prompt_ids += ids
    example = {"input_ids": input_ids[:max_length], "labels": labels[:max_length],
               "prompt_ids": prompt_ids, "reference": segments.reference}
    return example, {"fallback": int(fallback), "truncated": int(len(input_ids) > max_length)}


def _completion_segments(record: dict, tokenizer: Any, template: str) -> _Segments:
    if record.get("messages") is not None:
        instruction, input_text, output = _single_turn(record)
    else:
        instruction, input_text, output = _alpaca_fields(record)
    render = alpaca_prompt if template == "alpaca" else plain_prompt
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, which the response needs so the "
                          "model learns to stop; set tokenizer.eos_token")
    return _Segments([(render(instruction, input_text), False), (output, True)],
                     prefix_ids=_leading_special_ids(tokenizer),
                     suffix_ids=[tokenizer.eos_token_id], prompt_pieces=1, reference=output)


def _single_turn(record: dict) -> tuple[str, None, str]:
    messages = _normalise_messages(record["messages"])
    roles = [message["role"] for message in messages if message["role"] != "system"]
    if roles != ["user", "assistant"]:
        raise DataError("only a single user/assistant exchange fits the alpaca or none template; "
                        "use template: chat for multi-turn conversations")
    by_role = {message["role"]: message["content"] for message in messages}
    return by_role["user"], None, by_role["assistant"]


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before plain text (a BOS for Llama-2 style tokenizers)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _chat_segments(record: dict, tokenizer: Any) -> _Segments:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template: chat needs a tokenizer with a chat template, and this one "
                          "has none; use template: alpaca")
    messages = record_to_messages(record)
    full = _render(tokenizer, messages, generation_prompt=False)
    pieces, position, prompt_pieces, reference = [], 0, 0, ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[:index + 1], generation_prompt=False)
        if not (through.startswith(prompt) and full.startswith(through)
                and len(prompt) >= position):
            raise DataError("the chat template renders earlier turns differently once later "
                            "turns are added, so response boundaries are ambiguous; split the "
                            "conversation into one example per assistant turn")
        pieces += [(full[position:len(prompt)], False), (full[len(prompt):len(through)], True)]
        position, prompt_pieces, reference = len(through), len(pieces) - 1, message["content"]
    pieces.append((full[position:], False))
    return _Segments(pieces, prefix_ids=[], suffix_ids=[],
                     prompt_pieces=prompt_pieces, reference=reference)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # templates raise their own errors (e.g. roles must alternate)
        raise DataError(f"the tokenizer's chat template rejected the conversation: {error}") \
            from error


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # Templates write their special tokens as text, so the tokenizer must not add more.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _tokenize_pieces(tokenizer: Any, pieces: list[str]) -> tuple[list[list[int]], bool]:
    """Token ids per piece. Cuts the full text's tokens where each prefix's own tokens end,
    verifying that they are a prefix; if any is not, tokenizes the pieces separately."""
    full_ids = _tokenize(tokenizer, "".join(pieces))
    cuts, text_end = [0], 0
    for piece in pieces[:-1]:
        text_end += len(piece)
        prefix_ids = _tokenize(tokenizer, "".join(pieces)[:text_end])
        if full_ids[:len(prefix_ids)] != prefix_ids or len(prefix_ids) < cuts[-1]:
            return [_tokenize(tokenizer, piece) for piece in pieces], True
        cuts.append(len(prefix_ids))
    cuts.append(len(full_ids))
    return [full_ids[start:end] for start, end in zip(cuts, cuts[1:])], False
