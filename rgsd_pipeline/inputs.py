"""What each stage output of an iteration is made from, computed in one place for the writer and the checker.

A stage records these fingerprints in its manifest (rollouts, signals) or provenance (checkpoint) when it
writes, and `chain.verify_output` computes them again before a complete output is reused: an output whose
prompts, policy, rollouts, teacher or settings have changed since is refused, naming the folder.
"""

from __future__ import annotations

from pathlib import Path

from rgsd_pipeline import layout
from rgsd_pipeline.config import RunConfig, to_dict
from rgsd_pipeline.fingerprints import fingerprint, model_fingerprint
from rgsd_pipeline.models import resolve_model
from rgsd_pipeline.shards import read_manifest


def rollout_inputs(run: Path, iteration: int, config: RunConfig) -> dict[str, str]:
    """iter-I/rollouts/ is made from the prompt shards, the policy's weights and the sampling settings."""
    policy = layout.policy_path(run, iteration, resolve_model(config.model))
    return {"prompts": fingerprint(read_manifest(layout.prompts_dir(run))["shards"]),
            "policy": model_fingerprint(policy),
            "config": fingerprint({"rollout": to_dict(config.rollout), "template": to_dict(config.template),
                                   "max_model_len": config.model.max_model_len, "iteration": iteration})}


def score_inputs(run: Path, iteration: int, config: RunConfig) -> dict[str, str]:
    """iter-I/signals/ is made from iter-I/rollouts/, the teacher's weights and the scoring settings."""
    return {"rollouts": fingerprint(read_manifest(layout.rollouts_dir(run, iteration))["shards"]),
            "teacher": model_fingerprint(resolve_model(config.model)),
            "config": fingerprint({"score": to_dict(config.score), "template": to_dict(config.template),
                                   "max_model_len": config.model.max_model_len})}


def reward_inputs(run: Path, iteration: int, config: RunConfig) -> dict[str, str]:
    """iter-I/rewards/ is made from iter-I/rollouts/, the prompts' rubrics and the judge's settings."""
    return {"rollouts": fingerprint(read_manifest(layout.rollouts_dir(run, iteration))["shards"]),
            "prompts": fingerprint(read_manifest(layout.prompts_dir(run))["shards"]),
            "config": fingerprint({"reward": to_dict(config.reward)})}


def train_inputs(run: Path, iteration: int, config: RunConfig) -> dict[str, str]:
    """iter-I/checkpoint/ is made from what its loss reads: iter-I/signals/, iter-I/rewards/ or both (and the policy,
    which their rollouts pin down)."""
    objective = config.train.objective
    made_from = {}
    if objective.reads_signals:
        made_from["signals"] = fingerprint(read_manifest(layout.signals_dir(run, iteration))["shards"])
    if objective.reads_rewards:
        made_from["rewards"] = fingerprint(read_manifest(layout.rewards_dir(run, iteration))["shards"])
    return made_from
