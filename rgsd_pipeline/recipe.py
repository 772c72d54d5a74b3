"""The run's frozen config: the recipe (digested, never changed by a command) and its placement (overridable).

    runs/<name>/run.yaml            the resolved config, its recipe's digest in its first lines (# recipe digest: ...)
    runs/<name>/.run.yaml.frozen    the recipe as frozen, what an edit of run.yaml is named against

The recipe is what changes a run's results: the model, data, template, sampling, scoring, loss and optimizer. It
is frozen the first time a run completes its prompts (`freeze`). A command that brings another recipe is refused
with the difference shown (`check_frozen`), and so is a run.yaml whose recipe was edited by hand, naming the keys
that changed (`load_run_config`): every output of a run comes from one recipe, and records its digest.

Placement (`PLACEMENT`) is where and how the work runs: engines, teacher servers, batch sizes that do not change the
results, trackers. run.yaml holds the run's defaults; every command takes `section.key=value` overrides of them
(`use_placement`, which the stages a command starts inherit through the environment), and every output records the
placement it was made with (`made_under`). docs/architecture.md, "The recipe and its placement", says why each key
is where it is.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import yaml

from rgsd_pipeline import layout
from rgsd_pipeline.config import (
    ConfigError,
    RunConfig,
    build_config,
    field_type,
    load_config,
    parse_override,
    to_dict,
)
from rgsd_pipeline.shards import describe_difference, write_json_atomic, write_text_atomic

# Where and how the work runs, not what it computes: overridable on every command (`section.key=value`), recorded
# per output, outside the recipe's digest. Each changes the results by float rounding at most (batching, chunking,
# sharding, parallelism), or not at all (where files and trackers go, timeouts, servers probed against the local
# teacher), except the engine kinds: vLLM and transformers draw different samples of the same policy, and the
# output records which drew them. Every other key is the recipe.
PLACEMENT = (
    "engine.kind", "engine.score_kind", "engine.hf_batch_size", "engine.vllm_gpu_memory_utilization",
    "engine.vllm_tensor_parallel_size", "engine.vllm_enforce_eager", "engine.vllm_cpu_kvcache_gib",
    "engine.vllm_cpu_in_process", "engine.teacher_urls", "engine.teacher_model", "engine.teacher_api_key_env",
    "engine.teacher_concurrency", "engine.teacher_timeout_s", "engine.teacher_max_retries", "engine.teacher_tolerance",
    "reward.judge_url", "reward.judge_concurrency", "reward.judge_timeout_s", "reward.judge_max_retries",
    "train.micro_batch_size", "train.gradient_checkpointing", "train.chunk_positions", "train.save_every",
    "train.keep_states", "train.state_every_iterations", "train.parallel", "train.report_to", "train.report_project",
    "train.max_rollout_logprob_gap",
)
PLACEMENT_ENV = "RGSD_PLACEMENT"  # this command's placement overrides (JSON), inherited by the stages it starts
PLACEMENT_DOCS = "docs/architecture.md, \"The recipe and its placement\", lists the placement keys"
_DIGEST_LINE = re.compile(r"^# recipe digest: ([0-9a-f]{64})$", re.MULTILINE)
_HEADER = """# The resolved config of this run, written by rgsd-pipeline when the run started. Its recipe (every key but
# the placement keys, docs/architecture.md) is frozen: commands refuse this file once the recipe differs from its
# digest below. To run an edited recipe, start a new run from a copy: rgsd-pipeline iterate --config COPY --run NEW
# Placement keys (engines, teacher servers, batch sizes, trackers) may be edited here or given to any command.
# recipe digest: {digest}
"""


def _without_placement(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _without_placement(value, f"{path}.")
        elif path not in PLACEMENT:
            out[key] = value
    return out


def _digest(raw: dict) -> str:
    """sha256 of the recipe part of a run.yaml mapping as written (a key a later release adds, absent from the file,
    leaves it unchanged)."""
    return hashlib.sha256(json.dumps(_without_placement(raw), sort_keys=True, default=str).encode()).hexdigest()


def placement_of(config: RunConfig) -> dict:
    """The placement keys of a config, dotted key -> value (what an output records it was made with)."""
    values = {}
    for key in PLACEMENT:
        section, name = key.split(".")
        values[key] = getattr(getattr(config, section), name)
    return values


def made_under(config: RunConfig) -> dict:
    """What a stage output records beside its inputs: the digest of the recipe and the placement it was made with."""
    return {"recipe_digest": config.digest or _digest(to_dict(config)), "placement": placement_of(config)}


def _with_placement(raw: dict, placement: dict) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in placement.items():
        section, name = key.split(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section} is not a section")
        node[name] = value
    return raw


def use_placement(overrides) -> dict:
    """Set this command's placement (`section.key=value` texts, or a dotted-key mapping), which every later read of
    run.yaml in this process and the processes it starts applies; a recipe key is refused. Returns the placement."""
    given = dict(overrides) if isinstance(overrides, dict) else {}
    if not isinstance(overrides, dict):
        for text in overrides:
            keys, value = parse_override(text)
            given[".".join(keys)] = value
    for key in given:
        if key not in PLACEMENT:
            if field_type(key.split(".")) is None:
                raise ConfigError(f"unknown key '{key}' (rgsd-pipeline config-reference lists them)")
            raise ConfigError(f"{key} is part of the run's recipe, frozen in run.yaml: a command cannot change it. "
                              "Start a new run to change it (rgsd-pipeline iterate --config RECIPE --run NEW ...); a "
                              f"command may change placement keys only ({PLACEMENT_DOCS})")
    build_config(_with_placement({}, given), "command line", combinations=False)  # each value checked now
    placement = {**json.loads(os.environ.get(PLACEMENT_ENV) or "{}"), **given}
    os.environ[PLACEMENT_ENV] = json.dumps(placement)
    return placement


def _parse_yaml(text: str, where: Path) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    return raw


def carry_commits(frozen: RunConfig, config: RunConfig) -> RunConfig:
    """`config` with the commits run.yaml pinned for the same Hub model and data sets (same id and revision), so that
    a recipe given again names the run's commits rather than wherever its revisions point now."""
    model = config.model
    if not model.commit and (model.path, model.revision) == (frozen.model.path, frozen.model.revision):
        model = dataclasses.replace(model, commit=frozen.model.commit)
    sources = list(config.data.sources)
    for i, (entry, pinned) in enumerate(zip(sources, frozen.data.sources, strict=False)):
        if isinstance(entry, dict) and isinstance(pinned, dict) and not entry["commit"] \
                and {**entry, "commit": pinned["commit"]} == pinned:
            sources[i] = pinned
    return dataclasses.replace(config, model=model, data=dataclasses.replace(config.data, sources=sources))


def check_frozen(run_dir: Path, config: RunConfig) -> RunConfig:
    """Refuse a command's config whose recipe differs from the run's frozen one (placement may differ: it is this
    command's), read as every stage reads it (a key a run made by an earlier release lacks takes its default) and
    given the frozen commits of the same Hub ids; returns the config with those commits."""
    frozen_path = layout.run_config_file(run_dir)
    if not frozen_path.exists():
        return config
    frozen_config = load_run_config(run_dir)
    config = carry_commits(frozen_config, config)
    frozen, resolved = _without_placement(to_dict(frozen_config)), _without_placement(to_dict(config))
    if frozen != resolved:
        raise ConfigError(
            f"{frozen_path} holds a different recipe than this command:\n"
            f"{describe_difference(frozen, resolved)}\n"
            "Use the same recipe (or none: later commands read run.yaml), or start a new --run folder. Placement keys "
            f"may differ ({PLACEMENT_DOCS})")
    return config


def freeze(run_dir: Path, config: RunConfig) -> RunConfig:
    """Write run.yaml (the resolved config, its recipe's digest in its first lines) and the record of the recipe it
    names changed keys from, unless the run has one; returns the config with its digest."""
    run_dir = Path(run_dir)
    frozen_path = layout.run_config_file(run_dir)
    if frozen_path.exists() and _DIGEST_LINE.search(frozen_path.read_text()):
        return load_run_config(run_dir)
    resolved = to_dict(config) if not frozen_path.exists() else _parse_yaml(frozen_path.read_text(), frozen_path)
    digest = _digest(resolved)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.frozen_recipe_file(run_dir),
                      {"recipe_digest": digest, "recipe": _without_placement(resolved)})
    write_text_atomic(frozen_path, _HEADER.format(digest=digest)
                      + yaml.safe_dump(resolved, sort_keys=False, width=120))
    config.digest = digest
    return config


def freeze_or_check(run_dir: Path, config: RunConfig) -> RunConfig:
    """check_frozen, then freeze: the first command of a run writes run.yaml, later ones must bring its recipe."""
    return freeze(run_dir, check_frozen(run_dir, config))


def command_config(run: Path, config_path: str | None, overrides: list[str]):
    """The config a `prepare` or `iterate` command brings: its recipe file (else the run's run.yaml, else the
    defaults) with its overrides. Its recipe must be the run's (check_frozen); its placement is this command's."""
    frozen = layout.run_config_file(run).exists()
    if config_path is None and frozen and not overrides:
        return load_run_config(run)
    source = config_path if config_path is not None else layout.run_config_file(run) if frozen else None
    return check_frozen(run, load_config(source, overrides))


def _edited(run_dir: Path, raw: dict, why: str) -> ConfigError:
    frozen_path = layout.run_config_file(run_dir)
    record = layout.frozen_recipe_file(run_dir)
    try:
        changed = describe_difference(json.loads(record.read_text())["recipe"], _without_placement(raw))
    except (OSError, ValueError, KeyError, TypeError):
        changed = f"  (which keys changed cannot be told: {record} is missing or damaged)"
    return ConfigError(
        f"{frozen_path} was edited after the run started ({why}):\n{changed}\n"
        "A run keeps the recipe it started with, so that all of its outputs come from one recipe. Undo the edit, or "
        f"run the edited recipe as a new run: rgsd-pipeline iterate --config {frozen_path} --run NEW_RUN_FOLDER "
        f"--iterations N. Placement keys may be changed in run.yaml or on any command ({PLACEMENT_DOCS})")


def load_run_config(run_dir: Path) -> RunConfig:
    """The frozen config of an existing run, this command's placement applied (use_placement); refuses a run.yaml
    whose recipe no longer matches its digest, naming the keys that changed."""
    frozen_path = layout.run_config_file(run_dir)
    if not frozen_path.exists():
        raise ConfigError(f"{frozen_path} does not exist: start the run with "
                          f"`rgsd-pipeline prepare --config CFG --run {run_dir}`")
    text = frozen_path.read_text()
    raw = _parse_yaml(text, frozen_path)
    digest, recorded = _digest(raw), _DIGEST_LINE.search(text)
    if recorded is not None and recorded.group(1) != digest:
        raise _edited(run_dir, raw, "its recipe no longer matches the digest in its first lines")
    record = layout.frozen_recipe_file(run_dir)
    if recorded is None and record.exists():
        raise _edited(run_dir, raw, "the digest line was removed")
    placement = json.loads(os.environ.get(PLACEMENT_ENV) or "{}")
    config = build_config(_with_placement(raw, placement), str(frozen_path))
    config.digest = digest  # a run.yaml of an earlier release has no digest line: the digest of what it holds
    return config
