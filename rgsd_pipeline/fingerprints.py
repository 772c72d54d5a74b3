"""Fingerprints of model folders: what a stage records about the models it read, so that stale outputs are refused.

A model's fingerprint covers its config, generation config, tokenizer files and chat template, and the
sha256 of every weights file's bytes, so a retrained checkpoint never passes for its base (their headers
and sizes are the same). Hashing gigabytes on every stage would be slow, so the digests are kept:

- folders rgsd-pipeline writes (checkpoints, built-in models) carry `rgsd-weights.json`, the digest of each
  weights file taken as it was written, with its size and modification time;
- any other folder is hashed once (streamed) and its digests cached under $RGSD_CACHE_DIR/weight-hashes/,
  keyed by (absolute path, size, modification time), so a 15 GB base model is read once, not per stage.

A digest is used only while the file's size and modification time are the ones it was taken with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rgsd_pipeline.cache import cache_dir
from rgsd_pipeline.shards import sha256_file, write_json_atomic, write_text_atomic

WEIGHTS_RECORD = "rgsd-weights.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt")


def fingerprint(obj) -> str:
    """sha256 of an object's canonical JSON: equal configs (or manifests, or lists of ids) give equal fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cache_dir() -> Path:
    return cache_dir() / "weight-hashes"


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def record_weight_hashes(folder: Path, digests: dict[str, str] | None = None) -> dict[str, str]:
    """Record the digest of every weights file of a folder we just wrote beside them (`digests`, file name -> sha256,
    taken while writing; else hashed here); returns them."""
    digests = digests or {}
    record = {file.name: {**_stamp(file), "sha256": digests.get(file.name) or sha256_file(file)}
              for file in _weight_files(folder)}
    write_json_atomic(Path(folder) / WEIGHTS_RECORD, record)
    return {name: entry["sha256"] for name, entry in record.items()}


def _cached_digest(file: Path) -> str:
    """sha256 of a weights file from the user cache, hashing (and caching) it when it is not there."""
    stamp = _stamp(file)
    key = hashlib.sha256(json.dumps([str(file.resolve()), stamp["size"], stamp["mtime_ns"]]).encode()).hexdigest()
    entry = _cache_dir() / f"{key}.txt"
    if entry.exists():
        return entry.read_text().strip()
    digest = sha256_file(file)
    entry.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(entry, digest)
    return digest


def weight_hashes(folder: Path) -> dict[str, str]:
    """file name -> sha256 of every weights file: from the folder's record while it is current, else the cache."""
    folder = Path(folder)
    recorded = json.loads((folder / WEIGHTS_RECORD).read_text()) if (folder / WEIGHTS_RECORD).exists() else {}
    hashes = {}
    for file in _weight_files(folder):
        entry = recorded.get(file.name)
        current = entry is not None and {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(file)
        hashes[file.name] = entry["sha256"] if current else _cached_digest(file)
    return hashes


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
