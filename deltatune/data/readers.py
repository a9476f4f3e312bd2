"""Reading raw records: every data source deltatune accepts becomes a list of plain dicts here.

Local files are recognised by extension — `.json` (a list of objects, or an object with exactly one
list field), `.jsonl`/`.ndjson`, `.csv`, `.tsv` (no quoting, the GLUE convention) and `.txt` (one
record `{"text": line}` per non-empty line). A source that is not an existing path is a Hugging
Face dataset, written `hf:PATH`, `hf:PATH:SPLIT` or `hf:PATH:CONFIG:SPLIT` (the `hf:` prefix may
be left out): `hf:tatsu-lab/alpaca:train`, `hf:nyu-mll/glue:sst2:validation`; the split defaults
to `train`. `columns` maps deltatune's canonical field names to the source's names and renames
them. A `.csv`/`.tsv` file's first row names its columns; with `header=False` (`--no-header`)
every row is data and the columns are named by position, "0", "1", ... (the option does not apply
to the other formats). Every problem raises `DataError` naming the file and, for a malformed line,
its line number; each record remembers where it came from (`record_location`) so that later
checks, after splitting and limits, can still name its file line.
"""
from __future__ import annotations

import codecs
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from deltatune.errors import DataError

FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                ".tsv": "tsv", ".txt": "txt"}
FILE_LIST = ".jsonl/.json/.csv/.tsv/.txt"
HUB_PREFIX = "hf:"


class Record(dict):
    """A record (a plain dict to every caller) that also knows where it was read: `where` is
    "PATH line N", "PATH record N" or "SOURCE row N"."""

    where: str = ""


def record_location(record: dict, source: str, index: int) -> str:
    """Where `record` came from, or "SOURCE record INDEX" for records not read by this module."""
    return getattr(record, "where", "") or f"{source} record {index}"


@dataclass(frozen=True)
class HubSource:
    """A parsed Hugging Face dataset source (`hf:PATH[:CONFIG]:SPLIT`)."""

    path: str
    config: str | None
    split: str


def read_records(source: str, columns: dict[str, str] | None = None,
                 limit: int | None = None, header: bool = True) -> list[dict]:
    """Reads up to `limit` records (the first ones) from a file or a Hugging Face dataset and
    renames the fields named in `columns` ({canonical name: source name}). `header=False`: a
    CSV/TSV file's first row is data and its columns are named "0", "1", ..."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of records, got {limit}")
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise DataError(f"data source {source} is a folder; give a .json, .jsonl, .csv, "
                            ".tsv or .txt file")
        rows = _read_file(path, limit, header)
        positional = not header and FILE_FORMATS.get(path.suffix.lower()) in ("csv", "tsv")
    elif source.startswith(HUB_PREFIX) or not _looks_like_file(source):
        rows, positional = _read_hub(parse_hub_source(source), source, limit), False
    else:
        raise DataError(f"data file {source} does not exist (looked in {path.resolve()}); "
                        "check the path")
    records = [_rename(row, columns or {}, where, positional) for where, row in rows]
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


def _read_file(path: Path, limit: int | None, header: bool = True) -> list[tuple[str, dict]]:
    """Returns (where, record) pairs; `where` locates the record for later error messages."""
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        found = f"unknown extension {path.suffix!r}" if path.suffix else "no extension"
        raise DataError(f"cannot read {path}: {found}; supported: "
                        f"{', '.join(sorted(FILE_FORMATS))} (rename the file to match its format)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if kind == "csv":
                return _take(_read_csv(handle, path, header), limit)
            if kind == "tsv":
                return _take(_read_tsv(handle, path, header), limit)
            reader = {"json": _read_json, "jsonl": _read_jsonl, "txt": _read_txt}[kind]
            return _take(reader(handle, path), limit)
    except UnicodeDecodeError as error:
        offset, line, reason = _first_undecodable_byte(path, error)
        raise DataError(f"{path} is not UTF-8 text ({reason} at byte {offset:,}, line {line:,}); "
                        "re-save it as UTF-8") from error


def _first_undecodable_byte(path: Path, error: UnicodeDecodeError) -> tuple[int, int, str]:
    """(file offset, line, reason) of the first byte that is not UTF-8. The text reader's error
    counts from the start of its read buffer, so the file is scanned again as bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as found:
                # The decoder's input is its carried-over partial character plus this chunk.
                start = offset - pending + found.start
                return start, lines + chunk[:max(start - offset, 0)].count(b"\n"), found.reason
            if not chunk:
                return error.start, lines, error.reason
            lines += chunk.count(b"\n")
            offset += len(chunk)


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
                        f"({_json_problem(error)})") from error
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


def _json_problem(error: json.JSONDecodeError) -> str:
    # json's messages for control characters end in "at" (it appends the position itself).
    problem = error.msg.removesuffix(" at")
    if problem == "Invalid control character":
        problem += " (a raw tab or line break inside a string; write it as \\t or \\n)"
    return problem


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
            raise DataError(f"{path} line {number}: invalid JSON ({_json_problem(error)} at "
                            f"column {error.colno}); each line must be one JSON object") from error
        if not isinstance(item, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, found "
                            f"{type(item).__name__}")
        yield f"{path} line {number}", item


def _read_csv(handle: Any, path: Path, header: bool = True) -> Iterator[tuple[str, dict]]:
    yield from _read_delimited(csv.reader(handle), path, "quote fields that contain commas",
                               header)


def _read_tsv(handle: Any, path: Path, header: bool = True) -> Iterator[tuple[str, dict]]:
    # GLUE-style TSV has no quoting, and its text holds stray quote characters.
    reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    yield from _read_delimited(reader, path, "a field must not contain a tab", header)


def _read_delimited(reader: Any, path: Path, hint: str,
                    header: bool = True) -> Iterator[tuple[str, dict]]:
    # Documents longer than csv's default 128 KiB field limit are ordinary in text data.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        names = None
        if header:
            names = next(reader, None)
            if names is None:
                return
        for row in reader:
            if not row:
                continue
            if names is None:  # no header: the first row fixes the number of columns
                names = [str(index) for index in range(len(row))]
            if len(row) != len(names):
                raise DataError(f"{path} line {reader.line_num}: expected {len(names)} fields "
                                f"({', '.join(names)}) but found {len(row)}; {hint}")
            yield f"{path} line {reader.line_num}", dict(zip(names, row))
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num}: malformed row ({error})") from error


def _read_txt(handle: Any, path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(handle, start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            yield f"{path} line {number}", {"text": line}


def _read_hub(hub: HubSource, source: str, limit: int | None) -> list[tuple[str, dict]]:
    # Without the prefix a source is only a guess at a dataset name: it may be a mistyped path.
    guessed = not source.startswith(HUB_PREFIX)
    try:
        import datasets
    except ImportError as error:
        install = "the `datasets` package: pip install 'deltatune[hub]'"
        if guessed:
            raise DataError(f"{source!r} is not a file; as a Hugging Face dataset name it needs "
                            f"{install} — or pass a path to a {FILE_LIST} file") from error
        raise DataError(f"reading Hugging Face dataset {source!r} needs {install}") from error
    split = hub.split if limit is None else f"{hub.split}[:{limit}]"
    try:
        dataset = datasets.load_dataset(hub.path, hub.config, split=split)
    except Exception as error:  # the hub raises many unrelated types for one user mistake
        also = f"; {source!r} is not a file either" if guessed else ""
        raise DataError(f"cannot load Hugging Face dataset {hub.path!r} (config {hub.config!r}, "
                        f"split {hub.split!r}): {error}. Syntax: hf:PATH[:CONFIG]:SPLIT"
                        f"{also}") from error
    return [(f"{source} row {index}", dict(row)) for index, row in enumerate(dataset, start=1)]


def _rename(row: dict, columns: dict[str, str], where: str, positional: bool) -> Record:
    record = Record(row)
    record.where = where
    for canonical, name in columns.items():
        if name not in row:
            raise DataError(_column_not_found(row, canonical, name, where, positional))
        del record[name]
    for canonical, name in columns.items():
        record[canonical] = row[name]
    return record


def _column_not_found(row: dict, canonical: str, name: str, where: str,
                      positional: bool) -> str:
    if positional and name.isdecimal():
        return (f"{where}: column {name} (given for {canonical!r}) is out of range: the file has "
                f"no header and its rows have {len(row)} fields, numbered 0 to {len(row) - 1}; "
                f"give a column number in that range")
    if positional:
        return (f"{where}: column {name!r} (given for {canonical!r}) is not a column number; "
                f"without a header the columns are numbered 0 to {len(row) - 1}, e.g. "
                f"--column {canonical}=0")
    return (f"{where}: column {name!r} (given for {canonical!r}) not found; "
            f"columns present: {', '.join(map(str, row))}")


def require_fields(records: list[dict], fields: Iterable[str], source: str,
                   hint: str = "") -> None:
    """Raises DataError naming the first record that lacks one of `fields` (or holds null
    there), and the columns it has, so the user can fix the `columns` mapping."""
    fields = list(fields)
    for index, record in enumerate(records, start=1):
        null = [name for name in fields if name in record and record[name] is None]
        if null:
            raise DataError(f"{source} record {index}: {null[0]} is null; give it a value or "
                            "remove the record")
        missing = [name for name in fields if name not in record]
        if missing:
            raise DataError(f"{source} record {index}: missing column(s) {', '.join(missing)}; "
                            f"columns present: {', '.join(map(str, record)) or 'none'}. Map "
                            f"them with columns: {{{missing[0]}: <your column>}}{hint}")


def require_text(records: list[dict], fields: Iterable[str], source: str) -> None:
    """Raises DataError naming the first record whose value in one of `fields` is a list, an
    object or a boolean (JSON data): text fields hold strings (numbers are read as text), and
    turning such a value into its Python spelling would train on the wrong text."""
    fields = list(fields)
    for index, record in enumerate(records, start=1):
        for name in fields:
            value = record.get(name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (str, int, float))):
                raise DataError(f"{record_location(record, source, index)}: {name} is "
                                f"{json_kind(value)} ({_preview(value)}); it must be a string — "
                                f"fix the record or map {name} to another column")


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, with its article, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


def _preview(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."
