"""Reading rubric data files row by row, keeping every row's file and number, never stopping at a bad row.

A source spec is `builtin:<name>` (data shipped in the package), a `.jsonl` / `.json` / `.ndjson`
file, a `.parquet` file, a folder written by `datasets.save_to_disk`, or a data set on the Hugging Face
Hub: `hf:org/name`, or the mapping `{hf: org/name, config, split, data_files, revision}` (HubSource). Each
yields `RawRow`s: either a parsed mapping or the reason it could not be parsed (non-JSON line, invalid
UTF-8, a truncated last line...). A file that cannot be opened at all raises SourceError.

A Hub data set is read as a model is (rgsd_pipeline/hub.py): its snapshot at the pinned commit (else its
revision) from the Hub cache, downloaded when missing and the Hub is reachable, then `datasets.load_dataset`
over that snapshot folder. `load_dataset("org/name")` itself refuses to run offline even when the snapshot
is cached, so the id is never handed to it. Rows are named `hf:org/name[split]` and their 1-based index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rgsd_pipeline import hub
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


HUB_PREFIX = "hf:"
HUB_KEYS = ("hf", "config", "split", "data_files", "revision", "commit")  # a Hub source's mapping, in this order


@dataclass(frozen=True)
class HubSource:
    """A data set on the Hub: which repository, configuration, split and files, at which revision and commit."""

    repo_id: str
    config: str | None = None  # the data set's configuration (load_dataset's `name`)
    split: str = "train"
    data_files: str | list | None = None  # files of the repository to read, relative to its root (globs allowed)
    revision: str = "main"
    commit: str = ""  # the commit `revision` resolved to, pinned by prepare in run.yaml

    @property
    def label(self) -> str:
        """How rows, quarantine entries and manifests name it: hf:org/name[:config][/files][split]."""
        files = self.data_files if isinstance(self.data_files, list) else [self.data_files] if self.data_files else []
        return (f"{HUB_PREFIX}{self.repo_id}" + (f":{self.config}" if self.config else "")
                + "".join(f"/{f}" for f in files) + f"[{self.split}]")

    def patterns(self) -> tuple[str, ...] | None:
        """What to download: the named files alone, else the whole repository."""
        if self.data_files is None:
            return None
        return tuple(self.data_files) if isinstance(self.data_files, list) else (self.data_files,)

    def snapshot(self) -> hub.Snapshot:
        """Its snapshot folder in the Hub cache, at the pinned commit when there is one."""
        return hub.snapshot(self.repo_id, self.commit or self.revision, "dataset", self.patterns())


def hub_source(entry) -> HubSource | None:
    """The HubSource a data.sources entry names (`hf:org/name`, or a mapping with an `hf` key), else None;
    SourceError for a Hub entry that is misspelled."""
    if isinstance(entry, str):
        if not entry.startswith(HUB_PREFIX):
            return None
        entry = {"hf": entry.removeprefix(HUB_PREFIX)}
    if not isinstance(entry, dict):
        raise SourceError(f"{entry!r} is neither a file, a builtin: name nor a Hub data set (hf:org/name or a mapping "
                          "with an hf key)")
    if "hf" not in entry:
        raise SourceError(f"{entry!r}: a mapping names a Hub data set with its hf key (hf: org/name)")
    unknown = [k for k in entry if k not in HUB_KEYS]
    if unknown:
        raise SourceError(f"{entry!r}: unknown key {unknown[0]!r}; a Hub data set takes {', '.join(HUB_KEYS)}")
    values = {k: entry[k] for k in HUB_KEYS if entry.get(k) is not None}
    repo_id = values.pop("hf")
    if not isinstance(repo_id, str) or not hub.is_repo_id(repo_id):
        raise SourceError(f"{entry!r}: hf must be a Hub data set id org/name, got {repo_id!r}")
    for key in ("config", "split", "revision", "commit"):
        if key in values and not isinstance(values[key], str):
            raise SourceError(f"{entry!r}: {key} must be a string, got {type(values[key]).__name__}")
    files = values.get("data_files")
    if files is not None and not (isinstance(files, str) or isinstance(files, list) and files
                                  and all(isinstance(f, str) for f in files)):
        raise SourceError(f"{entry!r}: data_files must be a path in the repository or a list of them")
    if values.get("commit") and not hub.COMMIT.fullmatch(values["commit"]):
        raise SourceError(f"{entry!r}: commit must be the 40 hex digits of a commit (prepare writes it)")
    return HubSource(repo_id, **values)


def canonical_source(entry):
    """A data.sources entry in one spelling: a Hub data set as the mapping of every HUB_KEYS key, anything else as
    it was given."""
    source = hub_source(entry)
    if source is None:
        return entry
    return {"hf": source.repo_id, "config": source.config, "split": source.split, "data_files": source.data_files,
            "revision": source.revision, "commit": source.commit}


def source_label(entry) -> str:
    """How a data.sources entry is named in manifests and messages: the spec itself, or a Hub source's label."""
    source = hub_source(entry)
    return source.label if source is not None else entry


def bundled_data_path(name: str) -> Path:
    if name not in BUILTIN_DATA:
        raise SourceError(f"unknown built-in data set 'builtin:{name}'; known: "
                          + ", ".join(f"builtin:{n}" for n in BUILTIN_DATA))
    return Path(str(resources.files("rgsd_pipeline") / "data" / BUILTIN_DATA[name]))


def source_path(spec) -> Path:
    """The local file or folder a source spec names (a Hub data set's snapshot folder); SourceError when there is
    none."""
    if (source := hub_source(spec)) is not None:
        return source.snapshot().path
    path = bundled_data_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"data source {spec}: {path} does not exist")
    if not (path.is_file() or path.is_dir()):  # a device or a pipe never ends: it would be hashed forever
        raise SourceError(f"data source {spec}: {path} is not a regular file or folder (a device, pipe or socket); "
                          "save the data to a .jsonl, .json or .parquet file and pass that")
    return path


def source_fingerprint(spec) -> str:
    """sha256 of a data file (or of every file of a datasets folder); a Hub data set's commit, which names its
    content (the manifest records it as the source's revision)."""
    from rgsd_pipeline.fingerprints import fingerprint
    from rgsd_pipeline.shards import sha256_file

    if (source := hub_source(spec)) is not None:
        return source.commit or source.snapshot().commit
    path = source_path(spec)
    if path.is_dir():
        return fingerprint({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return sha256_file(path)


def read_source(spec) -> Iterator[RawRow]:
    """Every row of a data source, parsed or with the reason it could not be."""
    if (source := hub_source(spec)) is not None:
        yield from _read_hub_dataset(source)
        return
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
# A string token as one run of plain characters between escapes ("unrolled"): the form `(?:[^"\\]|\\.)*` repeats
# its group once per character, and Python's re keeps state per repetition (a 50 MB string took 6 GB).
_ARRAY_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


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


def _read_hub_dataset(source: HubSource) -> Iterator[RawRow]:
    import datasets

    folder = source.snapshot().path
    try:
        table = datasets.load_dataset(str(folder), name=source.config, split=source.split,
                                      data_files=source.data_files)
    except Exception as err:  # datasets raises ValueError, FileNotFoundError, DatasetGenerationError ...
        raise SourceError(f"data source {source.label}: datasets could not read its snapshot {folder} "
                          f"({type(err).__name__}: {str(err)[:500]}); check config, split and data_files") from None
    for number, value in enumerate(table, start=1):
        yield RawRow(source.label, number, value)


def raw_text(value) -> str:
    """A row as compact JSON for the quarantine file, cut to 2,000 characters."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:2000]
    except (TypeError, ValueError):
        return repr(value)[:2000]
