"""Reading raw records: every data source deltatune accepts becomes a list of plain dicts here.

Local files are recognised by extension — `.json` (a list of objects, or an object with exactly one
list field), `.jsonl`/`.ndjson`, `.csv`, `.tsv` (no quoting, the GLUE convention) and `.txt` (one
record `{"text": line}` per non-empty line). A source that is not an existing path is a Hugging
Face dataset, written `hf:PATH`, `hf:PATH:SPLIT` or `hf:PATH:CONFIG:SPLIT` (the `hf:` prefix may
be left out): `hf:tatsu-lab/alpaca:train`, `hf:nyu-mll/glue:sst2:validation`; the split defaults
to `train`. `columns` maps deltatune's canonical field names to the source's names and renames
them. Every problem raises `DataError` naming the file and, for a malformed line, its line number.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from deltatune.errors import DataError

FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                ".tsv": "tsv", ".txt": "txt"}
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class HubSource:
    """A parsed Hugging Face dataset source (`hf:PATH[:CONFIG]:SPLIT`)."""

    path: str
    config: str | None
    split: str


def read_records(source: str, columns: dict[str, str] | None = None,
                 limit: int | None = None) -> list[dict]:
    """Reads up to `limit` records (the first ones) from a file or a Hugging Face dataset and
    renames the fields named in `columns` ({canonical name: source name})."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of records, got {limit}")
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise DataError(f"data source {source} is a folder; give a .json, .jsonl, .csv, "
                            ".tsv or .txt file")
        rows = _read_file(path, limit)
    elif source.startswith(HUB_PREFIX) or not _looks_like_file(source):
        rows = _read_hub(parse_hub_source(source), source, limit)
    else:
        raise DataError(f"data file {source} does not exist (looked in {path.resolve()}); "
                        "check the path")
    records = [_rename(row, columns or {}, source, where) for where, row in rows]
    if not records:
        raise DataError(f"data source {source} contains no records; give a file with at least "
                        "one example")
    return records


def parse_hub_source(source: str) -> HubSource:
    """`hf:PATH`, `hf:PATH:SPLIT` or `hf:PATH:CONFIG:SPLIT` (prefix optional) → HubSource."""
    text = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    parts = text.split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"cannot read Hugging Face dataset source {source!r}: write it as "
                        "hf:PATH, hf:PATH:SPLIT or hf:PATH:CONFIG:SPLIT "
                        "(e.g. hf:nyu-mll/glue:sst2:train)")
    if len(parts) == 1:
        return HubSource(parts[0], None, "train")
    if len(parts) == 2:
        return HubSource(parts[0], None, parts[1])
    return HubSource(parts[0], parts[1], parts[2])


def _looks_like_file(source: str) -> bool:
    return (Path(source).suffix.lower() in FILE_FORMATS
            or source.startswith(("/", "./", "../", "~", "\\")))


def _read_file(path: Path, limit: int | None) -> list[tuple[str, dict]]:
    """Returns (where, record) pairs; `where` locates the record for later error messages."""
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"cannot read {path}: unknown extension {path.suffix!r}; supported: "
                        f"{', '.join(sorted(FILE_FORMATS))}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv,
                      "tsv": _read_tsv, "txt": _read_txt}[kind]
            return _take(reader(handle, path), limit)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                        "re-save it as UTF-8") from error


def _take(rows: Iterable[tuple[str, dict]], limit: int | None) -> list[tuple[str, dict]]:
    taken = []
    for row in rows:
        if limit is not None and len(taken) >= limit:
            break
        taken.append(row)
    return taken


def _read_json(handle: Any, path: Path) -> Iterator[tuple[str, dict]]:
    text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        # A common mistake: JSON Lines saved with a .json name.
        if error.msg == "Extra data" and _first_line_is_object(text):
            yield from _read_jsonl(text.splitlines(keepends=True), path)
            return
        raise DataError(f"{path} line {error.lineno} column {error.colno}: invalid JSON "
                        f"({error.msg})") from error
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records or an object with exactly "
                            f"one list field, found an object with list fields {lists}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    for index, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path} record {index}: expected a JSON object with named fields, "
                            f"found {type(item).__name__}")
        yield f"{path} record {index}", item


def _first_line_is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.lstrip().split("\n", 1)[0]), dict)
    except json.JSONDecodeError:
        return False


def _read_jsonl(lines: Iterable[str], path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: invalid JSON ({error.msg} at column "
                            f"{error.colno}); each line must be one JSON object") from error
        if not isinstance(item, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, found "
                            f"{type(item).__name__}")
        yield f"{path} line {number}", item


def _read_csv(handle: Any, path: Path) -> Iterator[tuple[str, dict]]:
    yield from _read_delimited(csv.reader(handle), path, "quote fields that contain commas")


def _read_tsv(handle: Any, path: Path) -> Iterator[tuple[str, dict]]:
    # GLUE-style TSV has no quoting, and its text holds stray quote characters.
    reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    yield from _read_delimited(reader, path, "a field must not contain a tab")


def _read_delimited(reader: Any, path: Path, hint: str) -> Iterator[tuple[str, dict]]:
    # Documents longer than csv's default 128 KiB field limit are ordinary in text data.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {reader.line_num}: expected {len(header)} fields "
                                f"({', '.join(header)}) but found {len(row)}; {hint}")
            yield f"{path} line {reader.line_num}", dict(zip(header, row))
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num}: malformed row ({error})") from error


def _read_txt(handle: Any, path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(handle, start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            yield f"{path} line {number}", {"text": line}


def _read_hub(hub: HubSource, source: str, limit: int | None) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"{source!r} is not an existing file, so it was read as a Hugging Face "
                        "dataset, but the `datasets` package is not installed: "
                        "pip install deltatune[hub] (or fix the file path)") from error
    split = hub.split if limit is None else f"{hub.split}[:{limit}]"
    try:
        dataset = datasets.load_dataset(hub.path, hub.config, split=split)
    except Exception as error:  # the hub raises many unrelated types for one user mistake
        raise DataError(f"cannot load Hugging Face dataset {hub.path!r} (config {hub.config!r}, "
                        f"split {hub.split!r}): {error}. Syntax: hf:PATH[:CONFIG]:SPLIT") from error
    return [(f"{source} row {index}", dict(row)) for index, row in enumerate(dataset, start=1)]


def _rename(row: dict, columns: dict[str, str], source: str, where: str) -> dict:
    if not columns:
        return row
    record = dict(row)
    for canonical, name in columns.items():
        if name not in row:
            raise DataError(f"{where}: column {name!r} (given for {canonical!r}) not found; "
                            f"columns present: {', '.join(map(str, row))}")
        del record[name]
    for canonical, name in columns.items():
        record[canonical] = row[name]
    return record


def require_fields(records: list[dict], fields: Iterable[str], source: str,
                   hint: str = "") -> None:
    """Raises DataError naming the first record that lacks one of `fields`, and the columns it
    has, so the user can fix the `columns` mapping."""
    fields = list(fields)
    for index, record in enumerate(records, start=1):
        missing = [name for name in fields if record.get(name) is None]
        if missing:
            raise DataError(f"{source} record {index}: missing column(s) {', '.join(missing)}; "
                            f"columns present: {', '.join(map(str, record)) or 'none'}. Map "
                            f"them with columns: {{{missing[0]}: <your column>}}{hint}")
