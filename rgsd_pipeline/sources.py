"""Reading rubric data files row by row, keeping every row's file and number, never stopping at a bad row.

A source spec is `builtin:<name>` (data shipped in the package), a `.jsonl` / `.json` / `.ndjson`
file, a `.parquet` file, or a folder written by `datasets.save_to_disk`. Each yields `RawRow`s: either
a parsed mapping or the reason it could not be parsed (non-JSON line, invalid UTF-8, a truncated last
line...). A file that cannot be opened at all raises SourceError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rgsd_pipeline.errors import UserError

# medsci: 122 medical and science prompts with rubrics; checkable: 221 whose every criterion also carries a
# machine-checkable predicate for the rule judge; howto: the same questions, each with three criteria about how to
# answer (the demo's data). The last two are built by bench/make_checkable.py.
BUILTIN_DATA = {"medsci": "medsci.jsonl", "checkable": "checkable.jsonl", "howto": "howto.jsonl"}


class SourceError(UserError, ValueError):
    """A data source cannot be read at all; the message names it and says why."""


@dataclass
class RawRow:
    file: str
    row: int  # 1-based line number (JSONL) or row number (JSON array, Parquet, datasets); 0 = whole file
    value: dict | None  # the parsed row, or None when `error` says why it could not be parsed
    error: str | None = None
    raw: str | None = None  # the offending text, for the quarantine file
    field: str = "<row>"  # where in the row the problem is, when it is known


def bundled_data_path(name: str) -> Path:
    if name not in BUILTIN_DATA:
        raise SourceError(f"unknown built-in data set 'builtin:{name}'; known: "
                          + ", ".join(f"builtin:{n}" for n in BUILTIN_DATA))
    return Path(str(resources.files("rgsd_pipeline") / "data" / BUILTIN_DATA[name]))


def source_path(spec: str) -> Path:
    """The local file or folder a source spec names; SourceError when there is none."""
    path = bundled_data_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"data source {spec}: {path} does not exist")
    if not (path.is_file() or path.is_dir()):  # a device or a pipe never ends: it would be hashed forever
        raise SourceError(f"data source {spec}: {path} is not a regular file or folder (a device, pipe or socket); "
                          "save the data to a .jsonl, .json or .parquet file and pass that")
    return path


def source_fingerprint(spec: str) -> str:
    """sha256 of a data file (or of every file of a datasets folder)."""
    from rgsd_pipeline.fingerprints import fingerprint
    from rgsd_pipeline.shards import sha256_file

    path = source_path(spec)
    if path.is_dir():
        return fingerprint({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return sha256_file(path)


def read_source(spec: str) -> Iterator[RawRow]:
    """Every row of a data source, parsed or with the reason it could not be."""
    path = source_path(spec)
    if path.is_dir():
        yield from _read_datasets_folder(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_json_lines(path)
    else:
        raise SourceError(f"data source {path}: unknown file type {path.suffix!r}; "
                          "use .jsonl, .json, .parquet or a datasets folder")


class _Object(dict):
    """A parsed JSON object that remembers keys it was given twice with different values."""

    duplicated: tuple = ()


def _object(pairs: list[tuple[str, object]]) -> _Object:
    obj, seen = _Object(), {}
    duplicated = []
    for key, value in pairs:
        if key in seen and seen[key] != value:
            duplicated.append(key)
        seen[key] = value
    obj.update(pairs)
    obj.duplicated = tuple(duplicated)
    return obj


def _first_duplicate(value) -> str | None:
    """The first key given twice with different values anywhere in a parsed row (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if getattr(item, "duplicated", ()):
                return item.duplicated[0]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_row(name: str, number: int, text: str, last: bool = False) -> RawRow:
    """One row from its JSON text: the parsed object, or why it is not one. Never raises."""
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        reason = ("truncated last line: the file ends in the middle of a row" if last
                  else f"not valid JSON: {err.msg} at column {err.colno}")
        return RawRow(name, number, None, reason, text)
    except RecursionError:
        return RawRow(name, number, None, "nested too deeply to be a row (JSON recursion limit)", text[:2000])
    if not isinstance(value, dict):
        return RawRow(name, number, None, f"a row must be a JSON object, got {type(value).__name__}", text)
    if (key := _first_duplicate(value)) is not None:
        return RawRow(name, number, None, f"key {key!r} is given twice with different values; rgsd-pipeline does "
                                          "not choose between them", text, field=key)
    return RawRow(name, number, value)


def _read_json_lines(path: Path) -> Iterator[RawRow]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SourceError(f"data source {path} cannot be read: {err}") from err
    name = str(path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    if not data.strip():
        yield RawRow(name, 0, None, "file is empty")
        return
    if data.lstrip().startswith(b"["):
        yield from _read_json_array(name, data)
        return
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield RawRow(name, number, None, f"invalid UTF-8 at byte {err.start} of the line",
                         line.decode("utf-8", errors="replace"))
            continue
        yield parse_row(name, number, text, last=number == len(lines) and not ends_with_newline)


# The tokens that matter for splitting a JSON array into its elements: strings (skipped whole) and brackets.
_ARRAY_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _array_elements(text: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closed) of each top-level element of the JSON array `text`, found by bracket depth alone, so an
    element that does not parse cannot take its neighbours with it (unless its brackets do not balance: then
    it runs to the end of the file, and `closed` is False)."""
    depth, start = 0, None
    for token in _ARRAY_TOKENS.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth == 1:
                start = token.end()
        elif char in "]}":
            depth -= 1
            if depth == 0:
                if start is not None and text[start:token.start()].strip():
                    yield start, token.start(), True
                return
        elif char == "," and depth == 1:
            yield start, token.start(), True
            start = token.end()
    if start is not None and text[start:].strip():
        yield start, len(text), False  # the file ends inside the array or inside an element


_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _read_json_array(name: str, data: bytes) -> Iterator[RawRow]:
    """A .json file holding one array of row objects (accepted in place of JSONL); rows numbered from 1."""
    # Bytes that are not UTF-8 become lone surrogates here, so that only the element holding them is refused.
    text = data.decode("utf-8", "surrogateescape")
    for number, (start, end, closed) in enumerate(_array_elements(text), start=1):
        element = text[start:end].strip()
        if bad := _UNDECODED.search(element):
            yield RawRow(name, number, None, f"invalid UTF-8 at character {bad.start()} of the element", element[:2000])
        elif element.startswith(("{", "[")) or not element:
            row = parse_row(name, number, element)
            if row.value is None and not closed:
                row.error = (f"{row.error}; its brackets do not close before the end of the file, so elements after "
                             "it (if any) cannot be told apart: fix it, or write one row per line (JSONL)")
            yield row
        else:
            try:
                kind = type(json.loads(element)).__name__
            except json.JSONDecodeError:
                kind = "not valid JSON"
            yield RawRow(name, number, None, f"array element is {kind}, not an object", element[:2000])


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise SourceError(f"data source {path} is not a readable Parquet file: {err}") from err
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            number += 1
            yield RawRow(str(path), number, value)


def _read_datasets_folder(path: Path) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors
        raise SourceError(f"data source {path} is not a folder written by datasets.save_to_disk: {err}") from err
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, table in splits:
        name = f"{path}[{split}]" if split else str(path)
        for number, value in enumerate(table, start=1):
            yield RawRow(name, number, value)


def raw_text(value) -> str:
    """A row as compact JSON for the quarantine file, cut to 2,000 characters."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:2000]
    except (TypeError, ValueError):
        return repr(value)[:2000]
