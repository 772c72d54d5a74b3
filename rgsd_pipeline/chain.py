"""The fingerprint chain of an iteration: policy -> rollouts -> signals -> checkpoint.

Each complete output records what it was made from (manifest inputs, checkpoint provenance). Before an
output is reused, its record must match what it would be made from now: a retrained checkpoint changes the
policy's weight fingerprint, so the next iteration's rollouts (and everything after them) are refused,
naming the folder, instead of being silently reused. `chain.json` keeps one link per iteration.
"""

from __future__ import annotations

import json
from pathlib import Path

from rgsd_pipeline import layout
from rgsd_pipeline.config import RunConfig, fingerprint
from rgsd_pipeline.fingerprints import model_fingerprint
from rgsd_pipeline.models import resolve_model
from rgsd_pipeline.shards import ArtifactError, is_complete, read_manifest

STAGES = ("rollout", "score", "train")


def output_dir(run: Path, iteration: int, stage: str) -> Path:
    """The folder a stage writes in an iteration."""
    return {"rollout": layout.rollouts_dir, "score": layout.signals_dir, "train": layout.checkpoint_dir}[stage](
        run, iteration)


def _stale(folder: Path, iteration: int, why: str) -> ArtifactError:
    return ArtifactError(f"{folder} is stale: {why}. Delete it and the outputs after it (this iteration's and every "
                         f"later iteration's), then rerun iteration {iteration}")


def verify_output(run: Path, iteration: int, stage: str, config: RunConfig) -> None:
    """Refuse a complete output of `stage` that was made from other inputs than the current ones."""
    folder = output_dir(run, iteration, stage)
    if stage == "rollout":
        policy = layout.policy_path(run, iteration, resolve_model(config.model.path))
        if read_manifest(folder)["inputs"].get("policy") != model_fingerprint(policy):
            raise _stale(folder, iteration, f"it was sampled from other weights than {policy} holds now")
    elif stage == "score":
        rollouts = read_manifest(layout.rollouts_dir(run, iteration))
        inputs = read_manifest(folder)["inputs"]
        if inputs.get("rollouts") != fingerprint(rollouts["shards"]):
            raise _stale(folder, iteration, f"it scored other rollouts than {layout.rollouts_dir(run, iteration)}")
        if inputs.get("teacher") != model_fingerprint(resolve_model(config.model.path)):
            raise _stale(folder, iteration, f"its teacher is not {config.model.path} as it is now")
    elif stage == "train":
        signals = read_manifest(layout.signals_dir(run, iteration))
        provenance = json.loads(layout.provenance_file(folder).read_text())
        if provenance.get("signals") != fingerprint(signals["shards"]):
            raise _stale(folder, iteration, f"it was trained on other signals than "
                                            f"{layout.signals_dir(run, iteration)}")


def link(run: Path, iteration: int, config: RunConfig) -> dict:
    """The fingerprints linking a complete iteration to its policy, every output verified first."""
    for stage in STAGES:
        if not is_complete(output_dir(run, iteration, stage)):
            raise ArtifactError(f"{output_dir(run, iteration, stage)} is not complete")
        verify_output(run, iteration, stage, config)
    policy = layout.policy_path(run, iteration, resolve_model(config.model.path))
    return {"iteration": iteration, "policy": str(policy), "policy_fingerprint": model_fingerprint(policy),
            "rollouts": read_manifest(layout.rollouts_dir(run, iteration))["inputs"],
            "signals": read_manifest(layout.signals_dir(run, iteration))["inputs"],
            "checkpoint_fingerprint": model_fingerprint(layout.checkpoint_dir(run, iteration))}
