"""Instruction templates with the real SmolLM2 tokenizer: the response-only loss mask is checked
token by token (axolotl #2089), for the Alpaca template and the tokenizer's chat template,
single- and multi-turn, with truncation and the token-boundary fallback."""
from __future__ import annotations

import pytest

from deltatune.data.templates import (IGNORE_INDEX, alpaca_prompt, count_unfilled_placeholders,
                                      encode_instruction, encode_instructions,
                                      fill_placeholders, record_to_messages, render_prompt)
from deltatune.data.readers import read_records
from deltatune.errors import ConfigError, DataError

RECORD = {"instruction": "Convert the date to ISO 8601 format (YYYY-MM-DD).",
          "input": "the 5th of March, 2019", "output": "2019-03-05"}
CHAT = {"messages": [{"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello! How can I help?"},
                     {"role": "user", "content": "Say bye"},
                     {"role": "assistant", "content": "Bye."}]}


def labelled_runs(example: dict) -> list[list[int]]:
    """Contiguous runs of tokens that have loss."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token  # labels are the unshifted input ids
            current.append(token)
    return runs + ([current] if current else [])


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_alpaca_mask_token_by_token(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    example = encode_instruction(RECORD, tokenizer, "alpaca", max_length=512)
    prompt = alpaca_prompt(RECORD["instruction"], RECORD["input"])
    expected_prompt_ids = plain_ids(tokenizer, prompt)
    assert example["prompt_ids"] == expected_prompt_ids
    assert example["input_ids"] == plain_ids(tokenizer, prompt + RECORD["output"]) + \
        [tokenizer.eos_token_id]
    boundary = len(expected_prompt_ids)
    for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
        if position < boundary:
            assert label == IGNORE_INDEX, position
        else:
            assert label == token, position
    assert tokenizer.decode(example["input_ids"][:boundary]) == prompt
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == \
        ["2019-03-05" + tokenizer.eos_token]
    assert example["labels"][-1] == tokenizer.eos_token_id
    assert example["reference"] == "2019-03-05"


def test_alpaca_without_input_has_no_input_section(smollm2_tokenizer):
    record = {"instruction": "hi", "input": "", "output": "Hello!"}
    example = encode_instruction(record, smollm2_tokenizer, "alpaca", 512)
    assert smollm2_tokenizer.decode(example["prompt_ids"]) == \
        "### Instruction:\nhi\n\n### Response:\n"
    assert smollm2_tokenizer.decode(labelled_runs(example)[0]) == "Hello!<|im_end|>"


def test_none_template_mask(smollm2_tokenizer):
    example = encode_instruction(RECORD, smollm2_tokenizer, "none", 512)
    assert smollm2_tokenizer.decode(example["prompt_ids"]) == \
        f"{RECORD['instruction']}\n{RECORD['input']}\n"
    assert [smollm2_tokenizer.decode(run) for run in labelled_runs(example)] == \
        ["2019-03-05<|im_end|>"]


def test_chat_single_turn_mask_token_by_token(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    example = encode_instruction(RECORD, tokenizer, "chat", 512)
    messages = record_to_messages(RECORD)
    assert messages[0] == {"role": "user",
                           "content": f"{RECORD['instruction']}\n\n{RECORD['input']}"}
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == plain_ids(tokenizer, full)
    assert example["prompt_ids"] == plain_ids(tokenizer, prompt)
    boundary = len(example["prompt_ids"])
    assert example["input_ids"][:boundary] == example["prompt_ids"]
    for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
        assert label == (IGNORE_INDEX if position < boundary else token), position
    # The end-of-turn tokens are trained so the model learns to stop.
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == \
        ["2019-03-05<|im_end|>\n"]
    assert tokenizer.decode(example["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_chat_multi_turn_trains_every_assistant_turn(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    example = encode_instruction(CHAT, tokenizer, "chat", 512)
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    canonical = tokenizer.apply_chat_template(CHAT["messages"], tokenize=True)
    canonical = canonical["input_ids"] if hasattr(canonical, "keys") else canonical
    assert example["input_ids"] == list(canonical)
    assert tokenizer.decode(example["input_ids"]) == full
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == \
        ["Hello! How can I help?<|im_end|>\n", "Bye.<|im_end|>\n"]
    # Every unlabelled token belongs to the system/user turns or an assistant header.
    unlabelled = tokenizer.decode([token for token, label in
                                   zip(example["input_ids"], example["labels"])
                                   if label == IGNORE_INDEX])
    assert "Hello! How" not in unlabelled and "Bye." not in unlabelled
    assert unlabelled.count("<|im_start|>assistant\n") == 2
    # The generation prompt is everything before the last response.
    last_prompt = tokenizer.apply_chat_template(CHAT["messages"][:3], tokenize=False,
                                                add_generation_prompt=True)
    assert example["prompt_ids"] == plain_ids(tokenizer, last_prompt)
    assert example["reference"] == "Bye."


def test_sharegpt_conversations_are_accepted(smollm2_tokenizer):
    record = {"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    example = encode_instruction(record, smollm2_tokenizer, "chat", 512)
    assert [smollm2_tokenizer.decode(run) for run in labelled_runs(example)] == ["Yo<|im_end|>\n"]


def test_single_turn_messages_with_alpaca_template(smollm2_tokenizer):
    record = {"messages": CHAT["messages"][:2]}
    example = encode_instruction(record, smollm2_tokenizer, "alpaca", 512)
    assert smollm2_tokenizer.decode(example["prompt_ids"]) == alpaca_prompt("Hi there")
    with pytest.raises(DataError, match="use template: chat"):
        encode_instruction(CHAT, smollm2_tokenizer, "alpaca", 512)


def test_truncation_keeps_the_start_and_the_labels_that_fit(smollm2_tokenizer):
    full = encode_instruction(RECORD, smollm2_tokenizer, "alpaca", 512)
    boundary = len(full["prompt_ids"])
    cut = encode_instruction(RECORD, smollm2_tokenizer, "alpaca", boundary + 2)
    assert cut["input_ids"] == full["input_ids"][:boundary + 2]
    assert cut["labels"] == full["labels"][:boundary + 2]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    assert cut["prompt_ids"] == full["prompt_ids"]


def test_fully_truncated_responses_are_dropped_and_counted(smollm2_tokenizer):
    short = {"instruction": "hi", "output": "Hello"}
    boundary = len(encode_instruction(RECORD, smollm2_tokenizer, "alpaca", 512)["prompt_ids"])
    examples, counts = encode_instructions([RECORD, short, RECORD], smollm2_tokenizer, "alpaca",
                                           max_length=boundary)
    assert counts == {"dropped": 2, "truncated": 0, "boundary_fallbacks": 0}
    assert len(examples) == 1 and smollm2_tokenizer.decode(labelled_runs(examples[0])[0]) == \
        "Hello<|im_end|>"


def test_boundary_fallback_when_tokens_merge_across_the_prompt_end(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    # The prompt ends in "\n" and the output starts with "\n\n": the tokenizer merges the first
    # two newlines into one token, so the prompt's tokens are not a prefix of the full text's.
    record = {"instruction": "hi", "output": "\n\nHello"}
    full_ids = plain_ids(tokenizer, alpaca_prompt("hi") + record["output"])
    prompt_ids = plain_ids(tokenizer, alpaca_prompt("hi"))
    assert full_ids[:len(prompt_ids)] != prompt_ids
    examples, counts = encode_instructions([record], tokenizer, "alpaca", 512)
    assert counts["boundary_fallbacks"] == 1
    example = examples[0]
    assert example["input_ids"][:len(example["prompt_ids"])] == example["prompt_ids"]
    assert example["prompt_ids"] == plain_ids(tokenizer, alpaca_prompt("hi"))
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["\n\nHello<|im_end|>"]


def test_record_errors_name_the_record(smollm2_tokenizer):
    with pytest.raises(DataError, match=r"src record 2: .*needs `instruction` and `output`.*"
                                        r"has prompt, completion"):
        encode_instructions([RECORD, {"prompt": "a", "completion": "b"}], smollm2_tokenizer,
                            "alpaca", 512, source="src")
    with pytest.raises(DataError, match="no assistant message"):
        encode_instruction({"messages": [{"role": "user", "content": "x"}]}, smollm2_tokenizer,
                           "chat", 512)
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        encode_instruction(RECORD, smollm2_tokenizer, "vicuna", 512)


def test_chat_template_required(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match="use template: alpaca"):
        encode_instruction(RECORD, smollm2_tokenizer, "chat", 512)


def test_fill_placeholders():
    records = [{"instruction": "Who?", "output": "I am {{name}} by {{ author }}. {{other}}"},
               {"messages": [{"role": "assistant", "content": "{{name}}!"}]}]
    filled = fill_placeholders(records, {"name": "Delta", "author": "Acme"})
    assert filled[0]["output"] == "I am Delta by Acme. {{other}}"
    assert filled[1]["messages"][0]["content"] == "Delta!"
    assert records[0]["output"].startswith("I am {{name}}")  # inputs are not modified
    assert count_unfilled_placeholders(filled) == 1


def test_identity_placeholders_filled(shared_data):
    records = read_records(str(shared_data / "instruct" / "identity.json"))
    assert count_unfilled_placeholders(records) > 80
    filled = fill_placeholders(records, {"name": "DeltaBot", "author": "the deltatune team"})
    assert count_unfilled_placeholders(filled) == 0
    assert filled[0]["output"] == ("Hello! I am DeltaBot, an AI assistant developed by the "
                                   "deltatune team. How can I assist you today?")


@pytest.mark.parametrize("template", ["alpaca", "chat", "none"])
def test_render_prompt_matches_the_training_prompt(smollm2_tokenizer, template):
    ids = render_prompt("Translate: hello", smollm2_tokenizer, template)
    trained = encode_instruction({"instruction": "Translate: hello", "output": "bonjour"},
                                 smollm2_tokenizer, template, 512)
    assert ids == trained["prompt_ids"] == trained["input_ids"][:len(ids)]
    with_system = render_prompt("hi", smollm2_tokenizer, "chat", system="Be terse.")
    assert smollm2_tokenizer.decode(with_system) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n")
