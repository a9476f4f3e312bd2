"""Bad data a user can hand deltatune, each a one-line DataError saying what, where and the fix:
label rules (stray ids, mixed kinds, non-scalar values, one class, the class cap), splits that
would leave no evaluation record, reader messages (JSON control characters, UTF-8 offsets, a
path read as a hub name) and headerless CSV/TSV files with positional columns."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from deltatune.data import (DataConfig, build_datasets, discover_label_names, label_to_index,
                            read_records, resolve_label_names, split_records)
from deltatune.data.classification import MAX_DERIVED_CLASSES
from deltatune.data.readers import require_fields, require_text
from deltatune.errors import DataError


def write_tsv(path: Path, rows: list[tuple[str, str]], header: bool = True) -> str:
    lines = (["text\tlabel"] if header else []) + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


# -- integer label ranges -----------------------------------------------------------------------

def test_stray_huge_label_names_value_record_and_fix_without_building_the_range(tmp_path):
    rows = [(f"sentence {index}", str(index % 2)) for index in range(20)]
    rows.insert(12, ("oops", "1000000000"))
    source = write_tsv(tmp_path / "train.tsv", rows)
    with pytest.raises(DataError) as error:
        discover_label_names(DataConfig(train=source), seed=0)
    message = str(error.value)
    # Line 14: the header, then the 13th data row — after the split, still its file line.
    assert message.startswith(f"{source} line 14: label 1000000000 would give the classifier "
                              "1,000,000,001 outputs")
    assert "only 3 distinct labels (0, 1, 1000000000)" in message
    assert "map the labels to 0..2" in message and "label_names" in message
    assert "\n" not in message


def test_a_few_unused_integer_ids_are_fine_a_far_larger_range_is_not():
    assert resolve_label_names([1, 2, 3, 4, 5]) == ["0", "1", "2", "3", "4", "5"]  # 1-based
    # Two distinct labels allow up to max(2 * 2, 2 + 8) = 10 classes.
    assert len(resolve_label_names([0, 9])) == 10
    with pytest.raises(DataError, match=r"training record 2: label 10 would give the classifier "
                                        r"11 outputs .* only 2 distinct labels"):
        resolve_label_names([0, 10])
    # 100 distinct labels allow 200 classes.
    assert len(resolve_label_names(list(range(100)) + [199])) == 200
    with pytest.raises(DataError, match="label 50000 would give the classifier 50,001 outputs"):
        resolve_label_names([0, 1, 2, 3, 50000])


def test_class_cap_unless_label_names_are_given():
    many = list(range(MAX_DERIVED_CLASSES + 1))
    with pytest.raises(DataError, match=r"0\.\.10000 would give 10,001 classes, more than the "
                                        r"10,000 derived from data; give label_names"):
        resolve_label_names(many)
    with pytest.raises(DataError, match="10,001 distinct labels in 10,001 training records"):
        resolve_label_names([f"class {index}" for index in many])
    names = [str(index) for index in many]
    assert resolve_label_names(many, names) == names


def test_negative_label_names_its_record():
    with pytest.raises(DataError, match=r"training record 3: integer labels must be 0 or more, "
                                        r"found -1"):
        resolve_label_names([0, 1, -1])


# -- label kinds and types ----------------------------------------------------------------------

def test_integers_mixed_with_text_name_the_odd_label_and_record(tmp_path):
    rows = [(f"s{index}", str(index % 11)) for index in range(30)] + [("bad", "junk")]
    source = write_tsv(tmp_path / "train.tsv", rows)
    with pytest.raises(DataError, match=rf"{re.escape(source)} line 32: label 'junk' is the "
                                        r"first non-integer label, but 19 of the 20 training "
                                        r"labels are integers"):
        discover_label_names(DataConfig(train=source, eval_fraction=0.1))
    with pytest.raises(DataError, match=r"training record 4: label 3 is the first integer "
                                        r"label, but 3 of the 4 training labels are class names"):
        resolve_label_names(["pos", "neg", "pos", 3])


@pytest.mark.parametrize("label,kind", [([1], "a list"), ({"a": 1}, "an object"),
                                        (True, "a boolean")])
def test_non_scalar_labels_name_record_and_type(tmp_path, label, kind):
    records = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": label}]
    source = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=rf"{re.escape(source)} line 3: label is {kind} "):
        discover_label_names(DataConfig(train=source, eval=source))
    with pytest.raises(DataError, match=rf"dev record 1: label is {kind}"):
        label_to_index(label, ["0", "1"], "dev record 1")


def test_null_and_empty_labels():
    with pytest.raises(DataError, match="src record 2: label is null; give it a value"):
        require_fields([{"text": "a", "label": 0}, {"text": "b", "label": None}],
                       ["text", "label"], "src")
    with pytest.raises(DataError, match="training record 2: label is empty"):
        resolve_label_names(["pos", " "])


def test_integral_floats_are_integer_labels_fractions_are_errors():
    assert resolve_label_names([0.0, 1.0, 2.0]) == ["0", "1", "2"]
    assert label_to_index(1.0, ["0", "1"], "x") == 1
    with pytest.raises(DataError, match="training record 2: label 0.5 is not a whole number"):
        resolve_label_names([1, 0.5])
    # ASCII digits only: int() would accept other scripts' digits, so they stay class names.
    assert resolve_label_names(["\u0663", "a"]) == ["a", "\u0663"]


@pytest.mark.parametrize("text,kind", [(["a", "b"], "a list"), ({"t": "x"}, "an object"),
                                       (False, "a boolean")])
def test_non_string_texts_name_field_record_and_type(tmp_path, text, kind):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": 0},
                                                {"text": "ok", "text_pair": text, "label": 1}])
    records = read_records(source)
    with pytest.raises(DataError, match=rf"{re.escape(source)} line 2: text_pair is {kind} "
                                        r"\(.*\); it must be a string"):
        require_text(records, ["text", "text_pair"], source)
    require_text([{"text": 12, "text_pair": None}], ["text", "text_pair"], "src")  # numbers: text


def test_non_string_text_fails_build_datasets(minilm_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": ["a"], "label": 0},
                                                {"text": "b", "label": 1}])
    with pytest.raises(DataError, match=r"d.jsonl line 1: text is a list"):
        build_datasets(DataConfig(train=source, eval=source), minilm_tokenizer,
                       "classification")


def test_single_class_training_set(tmp_path):
    source = write_tsv(tmp_path / "train.tsv", [(f"s{index}", "pos") for index in range(12)])
    with pytest.raises(DataError, match=r"only one class \('pos'\) in 10 training records; "
                                        r"classification needs at least two"):
        discover_label_names(DataConfig(train=source, eval_fraction=0.2))
    with pytest.raises(DataError, match="label_names has only one class"):
        resolve_label_names([], ["pos"])
    # Given label_names, a one-class file is fine (evaluating a run on one class's examples).
    assert resolve_label_names(["pos", "pos"], ["neg", "pos"]) == ["neg", "pos"]


# -- splits -------------------------------------------------------------------------------------

def test_split_of_singleton_classes_still_gives_one_eval_record():
    records = [{"label": name} for name in "abcde"]
    train, eval_records = split_records(records, 0.1, seed=3, stratify="label")
    assert len(eval_records) == 1 and len(train) == 4
    assert (train, eval_records) == split_records(records, 0.1, seed=3, stratify="label")
    assert {r["label"] for r in train + eval_records} == set("abcde")


@pytest.mark.parametrize("size", range(2, 13))
@pytest.mark.parametrize("stratify", [None, "label"])
def test_two_or_more_records_always_give_both_parts(size, stratify):
    for labels in ([index for index in range(size)], [index % 2 for index in range(size)],
                   [0] * (size - 1) + [1]):
        records = [{"id": index, "label": label} for index, label in enumerate(labels)]
        train, eval_records = split_records(records, 0.01, seed=size, stratify=stratify)
        assert train and eval_records and len(train) + len(eval_records) == size
    assert split_records([{"label": 0}], 0.5, seed=0) == ([{"label": 0}], [])


# -- reader messages ----------------------------------------------------------------------------

def test_control_character_message_reads_once(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a\tb", "label": 1}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(str(jsonl))
    message = str(error.value)
    assert "at at" not in message
    assert "Invalid control character (a raw tab or line break inside a string; write it as " \
           "\\t or \\n) at column" in message
    whole = tmp_path / "d.json"
    whole.write_text('[{"text": "a\tb"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json line 1 column 13: invalid JSON \(Invalid "
                                        r"control character \(a raw tab"):
        read_records(str(whole))


@pytest.mark.parametrize("prefix", [0, 6_500, 489_826, (1 << 20) - 1, 1 << 20])
def test_utf8_error_gives_the_file_offset(tmp_path, prefix):
    path = tmp_path / "d.txt"
    # Lines of 99 characters plus a newline; a Latin-1 "é" at byte `prefix` of the file.
    body = ("x" * 99 + "\n") * (prefix // 100) + "y" * (prefix % 100)
    path.write_bytes(body.encode() + b"\xe9 more\n")
    with pytest.raises(DataError) as error:
        read_records(str(path))
    assert f"at byte {prefix:,}, line {prefix // 100 + 1:,})" in str(error.value)


def test_utf8_error_after_a_bom_and_split_character(tmp_path):
    path = tmp_path / "d.txt"
    # A valid 2-byte character straddles the scanner's 1 MiB chunk boundary.
    data = b"\xef\xbb\xbf" + b"a" * ((1 << 20) - 4) + "é".encode() + b"b\n\xff\n"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(DataError, match=rf"invalid start byte at byte {offset:,}, line 2\)"):
        read_records(str(path))


def test_name_without_extension_and_no_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError) as error:
        read_records("data/sst2_train")
    assert str(error.value) == (
        "'data/sst2_train' is not a file; as a Hugging Face dataset name it needs the `datasets` "
        "package: pip install 'deltatune[hub]' — or pass a path to a .jsonl/.json/.csv/.tsv/.txt "
        "file")
    with pytest.raises(DataError, match=r"^reading Hugging Face dataset 'hf:imdb' needs the "
                                        r"`datasets` package: pip install 'deltatune\[hub\]'$"):
        read_records("hf:imdb")
    bare = tmp_path / "train"
    bare.write_text("text\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot read .*train: no extension; supported: .csv, "):
        read_records(str(bare))


# -- headerless CSV/TSV -------------------------------------------------------------------------

def test_headerless_tsv_names_columns_by_position(tmp_path):
    source = write_tsv(tmp_path / "senteval.tsv", [("good film", "1"), ("bad film", "0")],
                       header=False)
    assert read_records(source, header=False) == [{"0": "good film", "1": "1"},
                                                  {"0": "bad film", "1": "0"}]
    assert read_records(source, {"text": "0", "label": "1"}, header=False) == [
        {"text": "good film", "label": "1"}, {"text": "bad film", "label": "0"}]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('1,"a, b"\n0,c\n', encoding="utf-8")
    assert read_records(str(csv_file), {"label": "0", "text": "1"}, header=False)[0] == \
        {"label": "1", "text": "a, b"}


def test_headerless_positional_column_out_of_range(tmp_path):
    source = write_tsv(tmp_path / "d.tsv", [("good film", "1")], header=False)
    with pytest.raises(DataError, match=r"d.tsv line 1: column 5 \(given for 'label'\) is out of "
                                        r"range: the file has no header and its rows have 2 "
                                        r"fields, numbered 0 to 1"):
        read_records(source, {"text": "0", "label": "5"}, header=False)
    with pytest.raises(DataError, match=r"column 'label' \(given for 'label'\) is not a column "
                                        r"number; without a header the columns are numbered 0 "
                                        r"to 1, e.g. --column label=0"):
        read_records(source, {"label": "label"}, header=False)


def test_headerless_tsv_end_to_end_through_the_data_layer(minilm_tokenizer, tmp_path):
    rows = [(f"a fine film {index}" if index % 2 else f"a dull film {index}", str(index % 2))
            for index in range(20)]
    train = write_tsv(tmp_path / "train.tsv", rows, header=False)
    dev = write_tsv(tmp_path / "dev.tsv", rows[:4], header=False)
    config = DataConfig(train=train, eval=dev, header=False, columns={"text": "0", "label": "1"},
                        max_length=16)
    data = build_datasets(config, minilm_tokenizer, "classification")
    assert discover_label_names(config) == data.info["label_names"] == ["0", "1"]
    assert len(data.train) == 20 and len(data.eval) == 4  # the first row is data, not a header
    assert [example["label"] for example in data.eval] == [0, 1, 0, 1]
    assert minilm_tokenizer.decode(data.train[1]["input_ids"]) == "[CLS] a fine film 1 [SEP]"


def test_no_header_flag_and_yaml_column_numbers(tmp_path):
    from deltatune.cli import build_parser, build_train_spec
    from deltatune.spec import parse_run_spec

    args = build_parser().parse_args(["train", "--train", "t.tsv", "--no-header",
                                      "--column", "label=0", "--column", "text=1"])
    spec = build_train_spec(args)
    assert spec.data.header is False and spec.data.columns == {"label": "0", "text": "1"}
    assert build_train_spec(build_parser().parse_args(["train", "--train", "t.tsv"])).data.header
    raw = {"data": {"train": "t.tsv", "header": False, "columns": {"label": 0, "text": 1}}}
    assert parse_run_spec(raw).data.columns == {"label": "0", "text": "1"}
    assert build_parser().parse_args(["eval", "--no-header"]).no_header is True
