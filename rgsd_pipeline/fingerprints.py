"""Fingerprints of model folders: what a stage records about the models it read, so that stale outputs are refused.

A model's fingerprint covers its config, generation config, tokenizer files and chat template, and the
sha256 of every weights file's bytes, so a retrained checkpoint never passes for its base (their headers
and sizes are the same). Hashing gigabytes on every stage would be slow, so the digests are kept:

- folders rgsd-pipeline writes (checkpoints, built-in models) carry `rgsd-weights.json`, the record of what was
  written: every file's sha256 (a weights file's taken as it was written), size, modification and change time.
  Every read of such a folder (`weight_hashes`, which every stage's input fingerprints go through) verifies it
  against the record: a file missing, added, or whose bytes differ from what was written is an error naming it.
  The small files are hashed again each time. A weights file is trusted without a read while its size,
  modification time and change time (ctime: set by the kernel on every write, and not settable by a user) are the
  recorded ones; otherwise it is hashed once (a copied run folder) and must match the record;
- any other folder is hashed once (streamed) and its digests cached under $RGSD_CACHE_DIR/weight-hashes/,
  keyed by (absolute path, size, modification time), so a 15 GB base model is read once, not per stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rgsd_pipeline.cache import cache_dir
from rgsd_pipeline.errors import ArtifactError
from rgsd_pipeline.shards import SUCCESS, sha256_file, write_json_atomic, write_text_atomic

WEIGHTS_RECORD = "rgsd-weights.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt")


def fingerprint(obj) -> str:
    """sha256 of an object's canonical JSON: equal configs (or manifests, or lists of ids) give equal fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cache_dir() -> Path:
    return cache_dir() / "weight-hashes"


RECORD_VERSION = 2  # 1: weights files only, by size and mtime (read as such)


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def _written_files(folder: Path) -> list[Path]:
    """The files of a folder we write that its record covers: every visible top-level file but the record and the
    completion marker (trainer_state/ has its own checksums; hidden files are locks and temporary names)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in (WEIGHTS_RECORD, SUCCESS))


def record_weight_hashes(folder: Path, digests: dict[str, str] | None = None) -> dict[str, str]:
    """Record what a folder we just wrote holds (rgsd-weights.json): each file's sha256 (`digests`, file name ->
    sha256, taken while writing; else hashed here), size and times. Returns the weights files' digests."""
    digests = digests or {}
    files = {file.name: {**_stamp(file), "sha256": digests.get(file.name) or sha256_file(file)}
             for file in _written_files(folder)}
    write_json_atomic(Path(folder) / WEIGHTS_RECORD, {"version": RECORD_VERSION, "files": files})
    return {name: entry["sha256"] for name, entry in files.items() if name.endswith(".safetensors")}


def _cached_digest(file: Path, stamp: dict | None = None) -> str:
    """sha256 of a weights file from the user cache, hashing (and caching) it when it is not there; keyed by path,
    size and mtime (and `stamp`, for a file that a record must vouch for)."""
    stamp = stamp or {k: v for k, v in _stamp(file).items() if k != "ctime_ns"}
    key = hashlib.sha256(json.dumps([str(file.resolve()), *stamp.values()]).encode()).hexdigest()
    entry = _cache_dir() / f"{key}.txt"
    if entry.exists():
        return entry.read_text().strip()
    digest = sha256_file(file)
    entry.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(entry, digest)
    return digest


def _refused(folder: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{what}. {Path(folder) / WEIGHTS_RECORD} records what rgsd-pipeline wrote in {folder}, and "
                         "the folder has changed since: delete it (and the outputs made from it) and rerun the step "
                         "that wrote it (for a checkpoint, `rgsd-pipeline train --run R --iteration I`)")


def _read_record(folder: Path) -> dict | None:
    path = Path(folder) / WEIGHTS_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _refused(folder, f"{path} cannot be read ({err})") from None
    if not isinstance(record, dict):
        raise _refused(folder, f"{path} is not a record")
    if record.get("version") != RECORD_VERSION:  # version 1: weights files alone, each {size, mtime_ns, sha256}
        return {"files": record, "weights_only": True}
    return record


def verified_files(folder: Path) -> dict[str, str]:
    """file name -> sha256 of every file a folder we wrote holds, each checked against its record (see the module's
    docstring); ArtifactError naming the first that is missing, added or changed. {} for a folder without one."""
    folder = Path(folder)
    record = _read_record(folder)
    if record is None:
        return {}
    files = record.get("files")
    if not isinstance(files, dict):
        raise _refused(folder, f"{folder / WEIGHTS_RECORD} lists no files")
    present = {p.name: p for p in (_weight_files(folder) if record.get("weights_only") else _written_files(folder))}
    if missing := sorted(files.keys() - present.keys()):
        raise _refused(folder, f"{folder / missing[0]} is missing ({len(missing)} recorded file(s) gone)")
    if added := sorted(present.keys() - files.keys()):
        raise _refused(folder, f"{folder / added[0]} was not written there ({len(added)} file(s) added)")
    hashes = {}
    for name, file in present.items():
        entry = files[name]
        stamp = _stamp(file)
        if name.endswith(".safetensors"):
            keys = [k for k in ("size", "mtime_ns", "ctime_ns") if k in entry]  # version 1 records have no ctime
            unchanged = all(entry.get(k) == stamp[k] for k in keys)
            digest = entry.get("sha256") if unchanged else _cached_digest(file, stamp)
        else:
            digest = sha256_file(file)  # small files: read anyway by the fingerprint
        if digest != entry.get("sha256"):
            raise _refused(folder, f"{file} does not hold what was written there: its sha256 is {digest[:16]}..., "
                                   f"{str(entry.get('sha256'))[:16]}... was written")
        hashes[name] = digest
    return hashes


def weight_hashes(folder: Path) -> dict[str, str]:
    """file name -> sha256 of every weights file: from the folder's record, verified (verified_files), else from the
    cache (hashed once)."""
    folder = Path(folder)
    verified = verified_files(folder)
    if verified:
        return {name: sha for name, sha in verified.items() if name.endswith(".safetensors")}
    return {file.name: _cached_digest(file) for file in _weight_files(folder)}


def _hash_files(digest, folder: Path, names) -> None:
    for name in names:
        file = folder / name
        if file.exists():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")


def model_fingerprint(path: Path) -> str:
    """sha256 over what defines a model's behaviour: config, generation config, tokenizer files, chat template and
    the bytes of its weights."""
    digest = hashlib.sha256()
    _hash_files(digest, Path(path), ("config.json", "generation_config.json") + TOKENIZER_FILES)
    for name, sha in weight_hashes(path).items():
        digest.update(f"{name}\0{sha}\0".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 of the tokenizer files and chat template only: what student and teacher must share."""
    digest = hashlib.sha256()
    _hash_files(digest, Path(path), TOKENIZER_FILES)
    return digest.hexdigest()
