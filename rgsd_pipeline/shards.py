"""Crash-safe Parquet shards, manifests and stage-output locks.

A stage output is a folder:

    part-00000.parquet  part-00001.parquet  ...   complete shards (zstd Parquet)
    .progress/inputs.json                         fingerprints of the inputs this output is made from
    .progress/part-00000.json                     rows and sha256 of each complete shard, and who made it
    .progress/placement-<digest>.json             the placement (engines, servers, batch sizes) a shard was made with
    manifest.json                                 every shard, its rows and sha256, schema, inputs, the recipe's
                                                  digest and each placement the shards were made with
    _SUCCESS                                      written last: the output is complete

Work is planned as numbered shards whose content is a pure function of the inputs, so a stage that
was killed resumes by keeping the shards it finished and redoing the others, and N independent
workers (`--num-shards N --shard-index J`) each take the shard numbers congruent to J mod N. A shard
is written to a hidden temporary name, flushed to disk and renamed, so a visible `part-*.parquet` is
always whole. Whoever completes the last shard writes the manifest and then `_SUCCESS`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rgsd_pipeline.errors import ArtifactError, UserError  # noqa: F401 (ArtifactError: read from here too)
from schemas import MANIFEST_VERSION, SCHEMA_NAME_KEY, SCHEMA_VERSION_KEY, ArtifactSchema

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
PROGRESS = ".progress"
SHARD_NAME = re.compile(r"^part-\d{5}\.parquet$")


class ShardPlanError(UserError, ValueError):
    """A worker's place among the workers of a stage is impossible."""


class LockedError(UserError, RuntimeError):
    """Another process is writing the same stage output."""


def shard_file(index: int) -> str:
    return f"part-{index:05d}.parquet"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Write text (or bytes) to a temporary name, flush it to disk and rename it over `path`: a reader sees the
    old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _cleaned_on_failure(tmp, path):
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically (see write_text_atomic)."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete stage output (no checksum pass: see read_stage for a verified read); an
    ArtifactError naming it, and saying how to write it again, when it is missing, damaged or not a manifest."""
    folder = Path(folder)
    if not is_complete(folder):
        raise ArtifactError(f"{folder} is not complete (no {SUCCESS}); run or resume the stage that writes it")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        reason = "" if isinstance(manifest, dict) and {"shards", "inputs"} <= manifest.keys() else "not a manifest"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = f"{type(err).__name__}: {err}"
    if reason:
        raise ArtifactError(f"{folder / MANIFEST} cannot be read ({reason}); delete {folder} and rerun the command: "
                            "the stage then writes it again")
    return manifest


def manifest_mtime(folder: Path) -> int:
    """When a stage output's manifest was last written (0 when it has none): a cheap change marker."""
    path = Path(folder) / MANIFEST
    return path.stat().st_mtime_ns if path.exists() else 0


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files of writers killed between writing and renaming (`.<name>.tmp-<pid>`)."""
    for leftover in Path(folder).glob(".*.tmp-*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def is_complete(folder: Path) -> bool:
    """True once a stage output (or checkpoint) folder has its completion marker."""
    return (Path(folder) / SUCCESS).exists()


def mark_complete(folder: Path) -> None:
    """Write the completion marker, last, once everything else in `folder` is in place."""
    write_text_atomic(Path(folder) / SUCCESS, "")


@contextmanager
def _cleaned_on_failure(tmp: Path, final: Path):
    """A write that fails (disk full, file-size limit, I/O error) removes its temporary file and raises an
    ArtifactError naming the file it was writing; nothing partial is ever visible under the final name."""
    try:
        yield
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {final}: {err.strerror or err}; nothing was published, free space "
                            "(or raise the limit) and rerun the stage to resume") from err


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_table(table: pa.Table, schema: ArtifactSchema, where: str) -> pa.Table:
    """Return `table` cast to `schema` or raise ArtifactError naming the column and the first bad row."""
    expected = schema.arrow
    if table.schema.names != expected.names:
        raise ArtifactError(f"{where}: columns {table.schema.names} do not match the {schema.name} schema "
                            f"{expected.names}")
    for field in expected:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise ArtifactError(f"{where}: row {row} field '{field.name}' is null but the {schema.name} schema "
                                "requires a value")
    try:
        return table.cast(schema.stamped())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise ArtifactError(f"{where}: does not fit the {schema.name} schema v{schema.version}: {err}") from err


@contextmanager
def exclusive_lock(path: Path, what: str):
    """Hold an exclusive advisory lock on `path` for the duration; refuse at once if another process holds it.

    The kernel drops the lock when the holder dies (even by kill -9), so no stale locks remain.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"{what} is being written by another process (pid {holder}); lock file {path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def split_into_shards(items: list, per_shard: int, workers: int = 1, started: int | None = None) -> list[list]:
    """Consecutive pieces of at most `per_shard` items; one empty piece when there are none, so that every
    stage output has at least one shard.

    With several `workers` (the ranks of a job, or independent stage workers) no worker is left without a piece
    while there are items for it: the count is rounded up to a multiple of the workers (at most one piece per item)
    and the items spread evenly over the pieces, so each worker gets the same share. `started`, the shard count of
    an output already begun (StageOutput.started_shards), keeps its layout when a resumed job has another number
    of workers."""
    count = max(math.ceil(len(items) / per_shard), 1)
    if started is not None:
        count = started
    elif workers > 1:
        count = max(min(math.ceil(count / workers) * workers, len(items)), 1)
    if count == math.ceil(len(items) / per_shard):  # the layout depends on the count alone
        return [items[i:i + per_shard] for i in range(0, len(items), per_shard)] or [[]]
    size, extra = divmod(len(items), count)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size + (index < extra))
    return [items[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class ShardPlan:
    """Which shard numbers of a stage output this worker writes.

    Independent workers (`--num-shards N --shard-index J`) each try to finish the output, and whichever completes
    the last shard writes the manifest. Workers that form one job (`group`: a distributed.World, the ranks of a
    data-parallel `iterate`) wait for each other, and the main one writes it."""

    total: int  # shards in the whole output
    num_workers: int = 1
    worker_index: int = 0
    group: object | None = None  # the job's processes when the workers are its ranks (barrier(), main)

    @classmethod
    def of_world(cls, total: int, world) -> ShardPlan:
        """The share of rank r of W: the shards congruent to r mod W."""
        return cls(total, world.size, world.rank, world if world.size > 1 else None)

    def __post_init__(self):
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            raise ShardPlanError(f"--shard-index must be in [0, {self.num_workers}); got {self.worker_index}")

    def mine(self) -> list[int]:
        return [i for i in range(self.total) if i % self.num_workers == self.worker_index]


class StageOutput:
    """Writes the shards of one stage output, resumably; use as a context manager to hold the lock.

    >>> with StageOutput(folder, schema, inputs, plan) as out:
    ...     for index in out.todo():
    ...         out.write_shard(index, make_table(index))
    ...     out.finalize()          # writes manifest.json and _SUCCESS once every shard exists
    """

    def __init__(self, folder: Path, schema: ArtifactSchema, inputs: dict[str, str], plan: ShardPlan,
                 made_under: dict | None = None):
        self.folder = Path(folder)
        self.schema = schema
        self.inputs = dict(inputs)
        self.plan = plan
        self.made_under = made_under or {}  # recipe.made_under: the recipe's digest and this process's placement
        self._lock = None

    def __enter__(self) -> StageOutput:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / PROGRESS).mkdir(exist_ok=True)
        lock_name = f"lock-{self.plan.worker_index}-of-{self.plan.num_workers}"
        self._lock = exclusive_lock(self.folder / PROGRESS / lock_name,
                                    f"{self.folder} (worker {self.plan.worker_index})")
        self._lock.__enter__()
        try:
            self._check_inputs()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self._lock.__exit__(*exc)

    def _check_inputs(self) -> None:
        """Refuse to resume an output that was started from other inputs; record them otherwise."""
        recorded_path = self.folder / PROGRESS / "inputs.json"
        wanted = {"schema": self.schema.name, "schema_version": self.schema.version,
                  "total_shards": self.plan.total, "inputs": self.inputs}
        if recorded_path.exists():
            recorded = json.loads(recorded_path.read_text())
            if recorded != wanted:
                diff = describe_difference(recorded, wanted)
                raise ArtifactError(
                    f"{self.folder} was started from different inputs:\n{diff}\n"
                    f"Delete {self.folder} to redo this stage from the new inputs."
                )
        else:
            write_json_atomic(recorded_path, wanted)

    def is_complete(self) -> bool:
        return (self.folder / SUCCESS).exists()

    @staticmethod
    def started_shards(folder: Path) -> int | None:
        """The shard count an output was begun with (None when it was not begun), which its resume keeps."""
        recorded = Path(folder) / PROGRESS / "inputs.json"
        if not recorded.exists():
            return None
        try:
            return int(json.loads(recorded.read_text())["total_shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: the writer's own check of its inputs names the file

    def shard_done(self, index: int) -> bool:
        """True when shard `index` was written whole and its recorded checksum matches."""
        record_path = self.folder / PROGRESS / f"part-{index:05d}.json"
        shard_path = self.folder / shard_file(index)
        if not (record_path.exists() and shard_path.exists()):
            return False
        record = json.loads(record_path.read_text())
        return record.get("size") == shard_path.stat().st_size and record.get("sha256") == sha256_file(shard_path)

    def todo(self) -> list[int]:
        """This worker's shard numbers that are not yet complete, in order."""
        return [i for i in self.plan.mine() if not self.shard_done(i)]

    def write_shard(self, index: int, table: pa.Table, rows_per_group: int = 1024) -> None:
        """Validate `table` and publish it as shard `index` atomically."""
        final = self.folder / shard_file(index)
        table = validate_table(table, self.schema, f"{final}")
        tmp = self.folder / f".{final.name}.tmp-{os.getpid()}"
        with _cleaned_on_failure(tmp, final):
            with open(tmp, "wb") as sink:
                pq.write_table(table, sink, compression="zstd", row_group_size=rows_per_group,
                               **dict(self.schema.parquet_options))
                sink.flush()
                os.fsync(sink.fileno())
            record = {"index": index, "file": final.name, "rows": table.num_rows,
                      "sha256": sha256_file(tmp), "size": tmp.stat().st_size, **self._placement_record()}
            os.replace(tmp, final)
        write_json_atomic(self.folder / PROGRESS / f"part-{index:05d}.json", record)

    def _placement_record(self) -> dict:
        """{"placement": its digest} for a shard record, the placement itself written once beside the records."""
        if "placement" not in self.made_under:
            return {}
        placement = self.made_under["placement"]
        digest = hashlib.sha256(json.dumps(placement, sort_keys=True).encode()).hexdigest()[:16]
        path = self.folder / PROGRESS / f"placement-{digest}.json"
        if not path.exists():
            write_json_atomic(path, placement)
        return {"placement": digest}

    def finalize(self) -> bool:
        """Write manifest.json then _SUCCESS if every shard of the output is complete; return whether the output is
        complete. In a group, every member waits here until all have written their shards, and the main one writes."""
        group = self.plan.group
        if group is None:
            return self._finalize()
        group.barrier()
        if group.main:
            self._finalize()
        group.barrier()
        return self.is_complete()

    def _finalize(self) -> bool:
        with exclusive_lock(self.folder / PROGRESS / "lock-finalize", f"{self.folder} manifest"):
            if self.is_complete():
                return True
            records = []
            for index in range(self.plan.total):
                if not self.shard_done(index):
                    return False
                record = json.loads((self.folder / PROGRESS / f"part-{index:05d}.json").read_text())
                records.append({k: record[k] for k in ("index", "file", "rows", "sha256", "placement") if k in record})
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "schema": {"name": self.schema.name, "version": self.schema.version},
                "shards": records,
                "rows": sum(r["rows"] for r in records),
                "inputs": self.inputs,
            }
            if self.made_under:
                used = sorted({r["placement"] for r in records if "placement" in r})
                manifest["recipe_digest"] = self.made_under.get("recipe_digest", "")
                manifest["placements"] = {d: json.loads((self.folder / PROGRESS / f"placement-{d}.json").read_text())
                                          for d in used}
            remove_leftovers(self.folder)
            remove_leftovers(self.folder / PROGRESS)
            write_json_atomic(self.folder / MANIFEST, manifest)
            mark_complete(self.folder)
            return True


def describe_difference(old: dict, new: dict, prefix: str = "") -> str:
    """Lines `key: old -> new` for every leaf where two nested dicts differ."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_difference(a, b, f"{prefix}{key}.")
            if inner:
                lines.append(inner)
        elif a != b:
            lines.append(f"  {prefix}{key}: {a!r} -> {b!r}")
    return "\n".join(lines)


@dataclass(frozen=True)
class StageData:
    """A complete, verified stage output."""

    folder: Path
    manifest: dict

    @property
    def files(self) -> list[Path]:
        return [self.folder / s["file"] for s in self.manifest["shards"]]

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    def dataset(self):
        """A pyarrow dataset over the shards, in shard order."""
        import pyarrow.dataset as ds

        return ds.dataset([str(f) for f in self.files], format="parquet")

    def lazy(self):
        """A Polars LazyFrame over the shards, in shard order."""
        import polars as pl

        return pl.scan_parquet([str(f) for f in self.files])

    def read_shard(self, index: int) -> pa.Table:
        return pq.read_table(self.files[index])

    def iter_shards(self) -> Iterable[pa.Table]:
        for index in range(len(self.files)):
            yield self.read_shard(index)


def read_stage(folder: Path, schema: ArtifactSchema, expect_inputs: dict[str, str] | None = None,
               verify: bool = True) -> StageData:
    """Open a complete stage output, checking _SUCCESS, schema name and version, shard names and checksums.

    `expect_inputs`, when given, must equal the fingerprints recorded in the manifest for those keys.
    Raises ArtifactError that names the folder or shard and says what to do.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"{folder / MANIFEST}: manifest version {manifest.get('manifest_version')!r}, "
                            f"this rgsd-pipeline reads version {MANIFEST_VERSION}")
    found = manifest.get("schema", {})
    if found.get("name") != schema.name or found.get("version") != schema.version:
        version = found.get("version")
        older = found.get("name") == schema.name and isinstance(version, int) and version < schema.version
        raise ArtifactError(f"{folder / MANIFEST}: holds schema {found.get('name')!r} v{found.get('version')}, "
                            f"expected {schema.name!r} v{schema.version}"
                            + (f"; it was written by an earlier rgsd-pipeline: delete {folder} and rerun the stage "
                               "that writes it" if older else ""))
    for shard in manifest["shards"]:
        name = shard["file"]
        if not SHARD_NAME.match(name):
            raise ArtifactError(f"{folder / MANIFEST}: shard name {name!r} is not a plain part-NNNNN.parquet "
                                "inside the stage folder; refusing to read it")
        path = folder / name
        if not path.exists():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        if verify and sha256_file(path) != shard["sha256"]:
            raise ArtifactError(f"{path} does not match its checksum in the manifest (corrupt or modified); "
                                "delete the stage folder and rerun the stage")
        meta = pq.read_schema(path).metadata or {}
        version = meta.get(SCHEMA_VERSION_KEY, b"?").decode()
        if meta.get(SCHEMA_NAME_KEY, b"").decode() != schema.name or version != str(schema.version):
            raise ArtifactError(f"{path}: shard schema {meta.get(SCHEMA_NAME_KEY, b'?').decode()!r} v{version}, "
                                f"expected {schema.name!r} v{schema.version}")
    if expect_inputs:
        recorded = manifest.get("inputs", {})
        wanted = {k: recorded.get(k, "<absent>") for k in expect_inputs}
        if wanted != expect_inputs:
            raise ArtifactError(f"{folder} was made from other inputs than asked for:\n"
                                f"{describe_difference(wanted, expect_inputs)}")
    return StageData(folder=folder, manifest=manifest)
