"""Models and data sets by Hugging Face Hub id, read through the Hub cache (docs/architecture.md, "Hub ids").

A Hub id (`org/name`) with a revision (branch, tag or commit) resolves to a snapshot folder of the Hub cache
(`$HF_HUB_CACHE`, by default `$HF_HOME/hub`) through `huggingface_hub.snapshot_download`, which honours
`HF_TOKEN` and `HF_HUB_OFFLINE`: online it downloads what the cache lacks, offline it reads the cache alone.
Nothing here forces offline mode. A model's download is limited to its config, tokenizer and safetensors
files (never `*.bin` or other pickles); a data set's to its `data_files` when the source names them.

The snapshot folder is named by the commit it holds, so the commit a revision resolved to is that folder's
name. `prepare` writes it into run.yaml (`model.commit`, each Hub source's `commit`), and every later command
asks for that commit, so a run resumed later, or on a cluster with a pre-filled cache and no network, reads
the same files. Each (id, revision) is resolved once per process.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from rgsd_pipeline.errors import UserError

# org/name as the Hub spells repository ids (no leading dot or dash, no "..", at most 96 characters each side)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
COMMIT = re.compile(r"[0-9a-f]{40}")
# What a model folder needs: config and generation config, tokenizer files (tokenizer.json, vocab.json,
# merges.txt, SentencePiece models, chat templates), the safetensors weights and their index.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
REMOTE_CODE_FILES = ("*.py",)  # only with model.trust_remote_code


class HubError(UserError, ValueError):
    """A Hub id cannot be resolved; the message names the id and revision and says what to do."""


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    revision: str  # as asked for: a branch, tag or commit
    commit: str  # the commit it resolved to
    path: Path  # the snapshot folder in the Hub cache


def is_repo_id(name: str) -> bool:
    """Whether `name` is spelled as a Hub repository id (`org/name`)."""
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith((".", "-"))


def download_command(repo_id: str, revision: str, repo_type: str = "model",
                     patterns: tuple[str, ...] | list[str] | None = None) -> str:
    """The `hf download` command that puts a snapshot into the Hub cache (run it where there is network)."""
    words = ["hf", "download", repo_id, "--revision", revision]
    if repo_type != "model":
        words += ["--repo-type", repo_type]
    for pattern in patterns or ():
        words += ["--include", pattern]
    return shlex.join(words)


_snapshots: dict[tuple, Snapshot] = {}  # resolved snapshots by (id, revision, type, patterns), for this process


def snapshot(repo_id: str, revision: str, repo_type: str = "model",
             patterns: tuple[str, ...] | None = None) -> Snapshot:
    """The snapshot folder of `repo_id` at `revision` (downloaded when online and missing), once per process;
    HubError naming the id and revision when it cannot be had."""
    key = (repo_id, revision, repo_type, patterns)
    if key not in _snapshots:
        _snapshots[key] = _download(repo_id, revision, repo_type, patterns)
    return _snapshots[key]


def _download(repo_id: str, revision: str, repo_type: str, patterns: tuple[str, ...] | None) -> Snapshot:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{'' if repo_type == 'model' else repo_type + ' '}{repo_id} at revision {revision!r}"
    page = f"https://huggingface.co/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
    command = download_command(repo_id, revision, repo_type, patterns)
    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                 allow_patterns=list(patterns) if patterns else None)
    except GatedRepoError:
        raise HubError(f"{what} is gated: accept its conditions on {page} with your account, then give this "
                       "process a token (HF_TOKEN, or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such repository on the Hub, or it is private and no token with access to it "
                       "was given (HF_TOKEN, or `hf auth login`); check the id's spelling") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: the repository has no such branch, tag or commit; give one that exists "
                       f"(see {page}/tree/main), or leave the revision at main") from None
    except IncompleteSnapshotError as err:
        raise HubError(f"{what}: the Hub cache ({constants.HF_HUB_CACHE}) holds only part of this snapshot and "
                       f"the Hub cannot be reached to complete it ({err.__class__.__name__}); complete it where "
                       f"there is network, into the same cache: {command}") from None
    except LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubError(f"{what} is not in the Hub cache ({constants.HF_HUB_CACHE}) and {offline}; download it "
                       f"where there is network, into the same cache (HF_HOME or HF_HUB_CACHE): {command}") from None
    except HfHubHTTPError as err:
        raise HubError(f"{what}: the Hub answered {err}; retry, or download it with: {command}") from None
    path = Path(path)
    return Snapshot(repo_id, revision, path.name, path)


def model_snapshot(repo_id: str, revision: str, trust_remote_code: bool = False) -> Snapshot:
    """A model's snapshot: config, tokenizer and safetensors files only, every weights shard present."""
    import json

    from huggingface_hub import constants

    patterns = MODEL_FILES + (REMOTE_CODE_FILES if trust_remote_code else ())
    found = snapshot(repo_id, revision, "model", patterns)
    what = f"{repo_id} at revision {revision!r} (commit {found.commit})"
    command = download_command(repo_id, found.commit, "model", patterns)
    if not (found.path / "config.json").exists():
        raise HubError(f"{what} has no config.json: it is not a transformers model, or the cached snapshot is "
                       f"incomplete ({command})")
    index = found.path / "model.safetensors.index.json"
    if index.exists():
        missing = sorted({f for f in json.loads(index.read_text())["weight_map"].values()
                          if not (found.path / f).exists()})
        if missing:
            raise HubError(f"{what}: the cached snapshot lacks weights shard(s) {', '.join(missing[:3])}; complete "
                           f"it where there is network: {command}")
    elif not any(found.path.glob("*.safetensors")):
        where = ("the cached snapshot holds none: it may be incomplete, or the repository has only pickle weights"
                 if constants.HF_HUB_OFFLINE else "the repository has none")
        raise HubError(f"{what} has no safetensors weights ({where}); rgsd-pipeline never downloads *.bin or other "
                       "pickle weights, which can run code when loaded: pick a repository (or revision) that has "
                       "*.safetensors, or convert the weights yourself and give the local folder as model.path")
    return found


def pin_commits(config):
    """The run config with the commit of its Hub model and of each Hub data set filled in, resolved now (what
    `prepare` writes into run.yaml); anything already pinned, local or built-in is left as it is."""
    import dataclasses

    from rgsd_pipeline.sources import hub_source

    model = config.model
    if not model.commit and not Path(model.path).expanduser().exists() and is_repo_id(model.path):
        model = dataclasses.replace(model, commit=model_snapshot(model.path, model.revision,
                                                                 model.trust_remote_code).commit)
    sources = [entry if (source := hub_source(entry)) is None or source.commit else
               {**entry, "commit": source.snapshot().commit} for entry in config.data.sources]
    return dataclasses.replace(config, model=model, data=dataclasses.replace(config.data, sources=sources))
