"""Readers: every file format, the Hugging Face source syntax, column mapping and the errors a
user sees for malformed, missing or empty data (naming the file and line)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from deltatune.data.readers import HubSource, parse_hub_source, read_records, require_fields
from deltatune.errors import DataError


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_json_list(tmp_path):
    source = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": 1},
                                                    {"text": "b", "label": 0}]))
    assert read_records(source) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]


def test_json_object_with_one_list_field(tmp_path):
    source = write(tmp_path / "d.json", json.dumps({"version": 2, "data": [{"text": "a"}]}))
    assert read_records(source) == [{"text": "a"}]


def test_json_object_with_two_list_fields_is_an_error(tmp_path):
    source = write(tmp_path / "d.json", json.dumps({"a": [{"x": 1}], "b": [{"x": 2}]}))
    with pytest.raises(DataError, match=r"exactly one list field.*\['a', 'b'\]"):
        read_records(source)


def test_invalid_json_names_file_and_line(tmp_path):
    source = write(tmp_path / "bad.json", '[\n {"text": "a"},\n {"text": "b",}\n]')
    with pytest.raises(DataError) as error:
        read_records(source)
    assert "bad.json line 3" in str(error.value)


def test_json_record_that_is_not_an_object(tmp_path):
    source = write(tmp_path / "d.json", '[{"text": "a"}, "oops"]')
    with pytest.raises(DataError, match=r"d.json record 2: expected a JSON object"):
        read_records(source)


def test_jsonl_saved_as_json_is_read_as_jsonl(tmp_path):
    source = write(tmp_path / "d.json", '{"text": "a"}\n{"text": "b"}\n')
    assert [record["text"] for record in read_records(source)] == ["a", "b"]


def test_jsonl_skips_blank_lines(tmp_path):
    source = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    assert read_records(source) == [{"text": "a"}, {"text": "b"}]


def test_bad_jsonl_line_names_file_and_line_number(tmp_path):
    source = write(tmp_path / "train.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError) as error:
        read_records(source)
    message = str(error.value)
    assert "train.jsonl line 3" in message and "invalid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    source = write(tmp_path / "d.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: expected a JSON object, found list"):
        read_records(source)


def test_csv_with_quoted_delimiter_and_bom(tmp_path):
    source = write(tmp_path / "d.csv", '\ufefftext,label\n"hello, world",pos\nbye,neg\n')
    assert read_records(source) == [{"text": "hello, world", "label": "pos"},
                                    {"text": "bye", "label": "neg"}]


def test_csv_row_with_wrong_field_count_names_line(tmp_path):
    source = write(tmp_path / "d.csv", "text,label\na,1\nb,0\nc,1,extra\n")
    with pytest.raises(DataError) as error:
        read_records(source)
    message = str(error.value)
    assert "d.csv line 4" in message
    assert "expected 2 fields (text, label) but found 3" in message


def test_tsv_keeps_quote_characters(tmp_path):
    source = write(tmp_path / "d.tsv", 'label\tsentence\n1\ta "quoted" word\n0\tplain\n')
    assert read_records(source) == [{"label": "1", "sentence": 'a "quoted" word'},
                                    {"label": "0", "sentence": "plain"}]


def test_tsv_row_with_wrong_field_count_names_line(tmp_path):
    source = write(tmp_path / "d.tsv", "label\tsentence\n1\tfine\n\n0\n")
    with pytest.raises(DataError, match=r"d.tsv line 4: expected 2 fields .* found 1"):
        read_records(source)


def test_txt_one_record_per_non_empty_line(tmp_path):
    source = write(tmp_path / "d.txt", " = Title = \n\n   \nbody line\n")
    assert read_records(source) == [{"text": " = Title = "}, {"text": "body line"}]


def test_limit_reads_the_first_records(tmp_path):
    source = write(tmp_path / "d.jsonl", "".join(f'{{"i": {i}}}\n' for i in range(10)))
    assert [record["i"] for record in read_records(source, limit=3)] == [0, 1, 2]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope.jsonl does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        read_records(str(tmp_path))


def test_unknown_extension(tmp_path):
    source = write(tmp_path / "d.parquet", "x")
    with pytest.raises(DataError, match=r"unknown extension '.parquet'; supported: .csv"):
        read_records(source)


@pytest.mark.parametrize("name,text", [("e.json", "[]"), ("e.jsonl", "\n\n"),
                                       ("e.csv", "text,label\n"), ("e.txt", "\n  \n"),
                                       ("e.tsv", "")])
def test_empty_dataset(tmp_path, name, text):
    with pytest.raises(DataError, match="contains no records"):
        read_records(write(tmp_path / name, text))


def test_not_utf8(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(str(path))


def test_column_mapping_renames(tmp_path):
    source = write(tmp_path / "d.tsv", "label\tcontent\n1\tgood\n")
    assert read_records(source, {"text": "content"}) == [{"label": "1", "text": "good"}]


def test_column_mapping_can_swap_names(tmp_path):
    source = write(tmp_path / "d.jsonl", '{"a": 1, "b": 2}\n')
    assert read_records(source, {"a": "b", "b": "a"}) == [{"a": 2, "b": 1}]


def test_missing_column_lists_the_columns_present(tmp_path):
    source = write(tmp_path / "d.tsv", "label\tsentence\n1\tgood\n")
    with pytest.raises(DataError) as error:
        read_records(source, {"text": "content"})
    message = str(error.value)
    assert "'content'" in message and "columns present: label, sentence" in message
    assert "d.tsv line 2" in message


def test_require_fields_names_the_record_and_columns(tmp_path):
    with pytest.raises(DataError, match=r"src record 2: missing column\(s\) label; columns "
                                        r"present: text"):
        require_fields([{"text": "a", "label": 1}, {"text": "b"}], ["text", "label"], "src")


@pytest.mark.parametrize("source,expected", [
    ("hf:tatsu-lab/alpaca", HubSource("tatsu-lab/alpaca", None, "train")),
    ("hf:tatsu-lab/alpaca:test", HubSource("tatsu-lab/alpaca", None, "test")),
    ("hf:nyu-mll/glue:sst2:validation", HubSource("nyu-mll/glue", "sst2", "validation")),
    ("imdb", HubSource("imdb", None, "train")),
])
def test_parse_hub_source(source, expected):
    assert parse_hub_source(source) == expected


def test_bad_hub_syntax():
    with pytest.raises(DataError, match="hf:PATH:CONFIG:SPLIT"):
        parse_hub_source("hf:a:b:c:d")


def test_hub_source_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install 'deltatune\[hub\]'"):
        read_records("hf:nyu-mll/glue:sst2:train")


def test_hub_source_calls_load_dataset_and_maps_columns(monkeypatch):
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records = read_records("hf:nyu-mll/glue:sst2:train", {"text": "sentence"}, limit=2)
    assert calls == [("nyu-mll/glue", "sst2", "train[:2]")]
    assert records == [{"label": 1, "text": "good"}, {"label": 0, "text": "bad"}]


def test_hub_load_failure_is_a_data_error(monkeypatch):
    def load_dataset(path, config, split):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'nobody/nothing'"):
        read_records("nobody/nothing")


def test_sst2_train_and_dev_with_column_mapping(shared_data):
    dev = read_records(str(shared_data / "sst2" / "dev.tsv"), {"text": "content"})
    assert len(dev) == 872
    assert set(dev[0]) == {"text", "label"}
    assert dev[0] == {"label": "0", "text": "one long string of cliches ."}
    train = read_records(str(shared_data / "sst2" / "train.tsv"), {"text": "sentence"},
                         limit=500)
    assert len(train) == 500 and {record["label"] for record in train} == {"0", "1"}
    with pytest.raises(DataError, match="columns present: label, sentence"):
        read_records(str(shared_data / "sst2" / "train.tsv"), {"text": "content"})


def test_real_files_of_every_shared_format(shared_data):
    assert len(read_records(str(shared_data / "instruct" / "alpaca_en_demo.json"))) == 999
    assert len(read_records(str(shared_data / "text" / "c4_demo.jsonl"))) == 300
    trec = read_records(str(shared_data / "trec" / "test.tsv"))
    assert len(trec) == 500 and set(trec[0]) == {"label", "fine_label", "text"}
    wiki = read_records(str(shared_data / "text" / "wikitext2_valid.txt"))
    assert wiki[0] == {"text": " = Homarus gammarus = "}
