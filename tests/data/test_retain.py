"""Retain sets become examples exactly as training would encode them: plain text as the first N
blocks of the whole file (found without tokenising all of it), instruction records with the set's
template, and classification records with the model's head ids, the set's own classes found in
the file or given and checked against the head; bad sets fail with the fix in the message. Real
SST-2, TREC, C4 and WikiText files from ../shared/data are read the same way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltatune.data.classification import encode_classification_records
from deltatune.data.readers import read_records
from deltatune.data.retain import (RETENTION_EVAL_LIMIT, RetainSet, encode_retain_examples,
                                   encode_retain_set)
from deltatune.data.templates import IGNORE_INDEX, encode_instructions
from deltatune.data.text import build_text_blocks
from deltatune.errors import ConfigError, DataError

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran",
         "far", "good", "bad", "film", "what", "is", "it", "?", ".", "name", "sky", "blue"]
TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def texts(count: int) -> list[dict]:
    """Documents of varying length (3 to 13 words), so blocks straddle documents."""
    sentence = "the cat sat on a mat the dog ran far . good film".split()
    return [{"text": " ".join(sentence[:3 + (index * 5) % 11])} for index in range(count)]


# -- language models -------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [1, 3, 7, 40])
def test_text_blocks_are_the_first_blocks_of_the_whole_file(tmp_path, limit):
    tokenizer = word_tokenizer()
    records = texts(60)
    path = write_jsonl(tmp_path / "text.jsonl", records)
    expected = build_text_blocks(records, tokenizer, 16)
    examples = encode_retain_examples(RetainSet(str(path), limit=limit), tokenizer, "language", 16)
    assert examples == expected[:limit]
    assert all(example["labels"] == example["input_ids"] for example in examples)


def test_limit_comes_from_the_set_then_the_default_else_all(tmp_path):
    tokenizer = word_tokenizer()
    records = texts(200)
    path = write_jsonl(tmp_path / "text.jsonl", records)
    every_block = build_text_blocks(records, tokenizer, 8)
    assert len(every_block) > RETENTION_EVAL_LIMIT
    default = encode_retain_examples(RetainSet(str(path)), tokenizer, "language", 8,
                                     default_limit=RETENTION_EVAL_LIMIT)
    own = encode_retain_examples(RetainSet(str(path), limit=5), tokenizer, "language", 8,
                                 default_limit=RETENTION_EVAL_LIMIT)
    everything = encode_retain_examples(RetainSet(str(path)), tokenizer, "language", 8)
    assert default == every_block[:RETENTION_EVAL_LIMIT]
    assert own == every_block[:5]
    assert everything == every_block


def test_a_limit_beyond_the_file_keeps_the_short_last_block(tmp_path):
    tokenizer = word_tokenizer()
    path = write_jsonl(tmp_path / "text.jsonl", texts(3))
    examples = encode_retain_examples(RetainSet(str(path), limit=100), tokenizer, "language", 8)
    assert examples == build_text_blocks(texts(3), tokenizer, 8)
    assert len(examples[-1]["input_ids"]) < 8


def test_instruction_records_are_encoded_with_the_sets_template(tmp_path):
    tokenizer = word_tokenizer()
    records = [{"instruction": "what is the sky", "output": "blue"},
               {"instruction": "name a good film", "input": "the dog", "output": "the cat"},
               {"instruction": "what ran", "output": "the dog ran"}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    source = RetainSet(str(path), template="alpaca", limit=2)
    examples = encode_retain_examples(source, tokenizer, "language", 64)
    expected, _ = encode_instructions(records[:2], tokenizer, "alpaca", 64)
    assert examples == expected
    first = examples[0]
    trained = [token for token, label in zip(first["input_ids"], first["labels"])
               if label != IGNORE_INDEX]
    assert trained == tokenizer("blue", add_special_tokens=False)["input_ids"] + \
        [tokenizer.eos_token_id]


def test_instruction_fields_win_over_a_text_column(tmp_path):
    """Alpaca-style files often carry the whole rendered example as `text` too."""
    tokenizer = word_tokenizer()
    path = write_jsonl(tmp_path / "alpaca.jsonl",
                       [{"instruction": "what is the sky", "output": "blue",
                         "text": "what is the sky blue"}])
    example = encode_retain_examples(RetainSet(str(path), template="none"), tokenizer,
                                     "language", 64)[0]
    assert IGNORE_INDEX in example["labels"]


def test_columns_and_a_headerless_file_are_read_as_the_data_section_would(tmp_path):
    tokenizer = word_tokenizer()
    path = tmp_path / "plain.tsv"
    path.write_text("1\tthe cat sat\n2\tthe dog ran far\n", encoding="utf-8")
    source = RetainSet(str(path), columns={"text": "1"}, header=False)
    examples = encode_retain_examples(source, tokenizer, "language", 32)
    expected = build_text_blocks([{"text": "the cat sat"}, {"text": "the dog ran far"}],
                                 tokenizer, 32)
    assert examples == expected


def test_records_without_text_or_instructions_name_their_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"sentence": "the cat", "label": 1}])
    with pytest.raises(DataError, match=r"line 1: .*`text` records .*found columns sentence, "
                                        r"label\. Map yours with columns: \{text: "):
        encode_retain_examples(RetainSet(str(path)), word_tokenizer(), "language", 16)


def test_a_set_that_gives_no_examples_says_how_to_fix_it(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match=r"retain set 'empty' .* gives no examples at "
                                        r"max_length=16.*raise max_length"):
        encode_retain_examples(RetainSet(str(path)), word_tokenizer(), "language", 16)


def test_a_missing_file_and_an_unknown_kind_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        encode_retain_examples(RetainSet(str(tmp_path / "absent.jsonl")), word_tokenizer(),
                               "language", 16)
    path = write_jsonl(tmp_path / "text.jsonl", texts(2))
    with pytest.raises(ConfigError, match="unknown retain-set kind 'vision'"):
        encode_retain_examples(RetainSet(str(path)), word_tokenizer(), "vision", 16)


# -- classifiers -----------------------------------------------------------------------------

def classification_file(tmp_path: Path) -> Path:
    path = tmp_path / "earlier.tsv"
    rows = ["label\tsentence", "neg\tbad film", "pos\tgood film", "neg\tthe dog ran",
            "pos\tthe cat sat"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_classification_labels_are_the_heads_ids_of_the_sets_own_classes(tmp_path):
    tokenizer = word_tokenizer()
    source = RetainSet(str(classification_file(tmp_path)), columns={"text": "sentence"})
    head = ["HUM", "pos", "LOC", "neg"]
    encoded = encode_retain_set(source, tokenizer, "classification", 32, head)
    assert encoded.name == "earlier"
    assert encoded.label_ids == [3, 1]  # own classes sorted: neg, pos
    assert [example["label"] for example in encoded.examples] == [3, 1, 3, 1]
    records = read_records(str(source.path), source.columns)
    assert encoded.examples == encode_classification_records(records, tokenizer, head, 32)


def test_the_sets_classes_come_from_the_whole_file_even_under_a_limit(tmp_path):
    source = RetainSet(str(classification_file(tmp_path)), columns={"text": "sentence"},
                       limit=1)
    encoded = encode_retain_set(source, word_tokenizer(), "classification", 32,
                                ["neg", "x", "pos"])
    assert len(encoded.examples) == 1
    assert encoded.label_ids == [0, 2]


def test_integer_labels_index_the_sets_own_label_names(tmp_path):
    """SST-2 says 0/1; a head that called those classes negative/positive finds them by name."""
    path = tmp_path / "sst.tsv"
    path.write_text("label\ttext\n1\tgood film\n0\tbad film\n", encoding="utf-8")
    source = RetainSet(str(path), label_names=["negative", "positive"])
    encoded = encode_retain_set(source, word_tokenizer(), "classification", 32,
                                ["ABBR", "positive", "negative"])
    assert encoded.label_ids == [2, 1]
    assert [example["label"] for example in encoded.examples] == [1, 2]


def test_classes_the_head_lacks_are_named_with_the_heads_classes(tmp_path):
    source = RetainSet(str(classification_file(tmp_path)), columns={"text": "sentence"})
    with pytest.raises(ConfigError, match=r"retain set 'earlier' .* has classes pos that the "
                                          r"model's head does not have \(head classes: neg, "
                                          r"HUM\).*label_names"):
        encode_retain_set(source, word_tokenizer(), "classification", 32, ["neg", "HUM"])
    with pytest.raises(ConfigError, match=r"needs the class names of the model's head"):
        encode_retain_set(source, word_tokenizer(), "classification", 32, None)


def test_a_classification_set_without_a_text_column_says_which_to_map(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) text.*columns: \{text: "):
        encode_retain_set(RetainSet(str(classification_file(tmp_path))), word_tokenizer(),
                          "classification", 32, ["neg", "pos"])


# -- real data -------------------------------------------------------------------------------

def test_real_sst2_and_trec_sets_find_their_classes_in_a_grown_head(shared_data,
                                                                    minilm_tokenizer):
    """A head trained on SST-2 then TREC holds both label sets, SST-2's first."""
    head = ["0", "1"] + TREC_CLASSES
    sst2 = encode_retain_set(RetainSet(str(shared_data / "sst2" / "dev.tsv"),
                                       columns={"text": "content"}),
                             minilm_tokenizer, "classification", 64, head,
                             RETENTION_EVAL_LIMIT)
    trec = encode_retain_set(RetainSet(str(shared_data / "trec" / "test.tsv"), name="trec"),
                             minilm_tokenizer, "classification", 64, head,
                             RETENTION_EVAL_LIMIT)
    assert (sst2.name, sst2.label_ids) == ("dev", [0, 1])
    assert trec.label_ids == [2, 3, 4, 5, 6, 7]
    assert len(sst2.examples) == len(trec.examples) == RETENTION_EVAL_LIMIT
    assert {example["label"] for example in trec.examples} <= set(range(2, 8))
    # The first TREC question ("How far is it from Denver to Aspen ?") is NUM.
    assert trec.examples[0]["label"] == head.index("NUM")
    assert trec.examples[0]["input_ids"][0] == minilm_tokenizer.cls_token_id
    with pytest.raises(ConfigError, match=r"has classes ABBR, DESC, ENTY, HUM, LOC, NUM"):
        encode_retain_set(RetainSet(str(shared_data / "trec" / "test.tsv")), minilm_tokenizer,
                          "classification", 64, ["0", "1"])


@pytest.mark.parametrize("name", ["c4_demo.jsonl", "wikitext2_valid.txt"])
def test_real_text_sets_give_full_blocks_from_the_start_of_the_file(shared_data, name):
    tokenizer = word_tokenizer()
    path = shared_data / "text" / name
    blocks = encode_retain_examples(RetainSet(str(path)), tokenizer, "language", 128,
                                    default_limit=8)
    records = read_records(str(path))
    assert blocks == build_text_blocks(records[:400], tokenizer, 128)[:8]
    assert [len(block["input_ids"]) for block in blocks] == [128] * 8
