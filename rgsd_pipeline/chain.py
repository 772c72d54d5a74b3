"""The fingerprint chain of an iteration: policy -> rollouts -> signals (or rewards) -> checkpoint.

Each complete output records what it was made from (manifest inputs, checkpoint provenance). Before an
output is reused, its record must match what it would be made from now: a retrained checkpoint changes the
policy's weight fingerprint, so the next iteration's rollouts (and everything after them) are refused,
naming the folder, instead of being silently reused. `chain.json` keeps one link per iteration.
"""

from __future__ import annotations

import json
from pathlib import Path

from rgsd_pipeline import layout
from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.fingerprints import model_fingerprint
from rgsd_pipeline.inputs import reward_inputs, rollout_inputs, score_inputs, train_inputs
from rgsd_pipeline.models import resolve_model
from rgsd_pipeline.recipe import made_under
from rgsd_pipeline.shards import ArtifactError, is_complete, read_manifest

STAGES = ("rollout", "score", "train")  # RGSD: the teacher scores the rollouts


def stages_for(config: RunConfig) -> tuple[str, ...]:
    """The steps of one iteration of this run: rollout, then what the loss reads (the teacher's score, a judge's
    reward, or both), then train."""
    objective = config.train.objective
    return ("rollout", *(["score"] if objective.reads_signals else []),
            *(["reward"] if objective.reads_rewards else []), "train")


def output_dir(run: Path, iteration: int, stage: str) -> Path:
    """The folder a stage writes in an iteration."""
    return {"rollout": layout.rollouts_dir, "score": layout.signals_dir, "reward": layout.rewards_dir,
            "train": layout.checkpoint_dir}[stage](run, iteration)


def _stale(folder: Path, iteration: int, why: str) -> ArtifactError:
    return ArtifactError(f"{folder} is stale: {why}. Delete it and the outputs after it (this iteration's and every "
                         f"later iteration's), then rerun iteration {iteration}")


def verify_output(run: Path, iteration: int, stage: str, config: RunConfig) -> None:
    """Refuse a complete output of `stage` that was made from other inputs than the current ones."""
    folder = output_dir(run, iteration, stage)
    base = resolve_model(config.model)
    if stage == "train":
        recorded = json.loads(layout.provenance_file(folder).read_text())
        wanted = train_inputs(run, iteration, config)
    else:
        recorded = read_manifest(folder)["inputs"]
        wanted = {"rollout": rollout_inputs, "score": score_inputs, "reward": reward_inputs}[stage](run, iteration,
                                                                                                   config)
    changed = [key for key in wanted if recorded.get(key) != wanted[key]]
    made = json.loads(layout.provenance_file(folder).read_text()) if stage == "train" else read_manifest(folder)
    if made.get("recipe_digest") not in (None, made_under(config)["recipe_digest"]):  # None: an earlier release's
        changed.append("recipe")
    if not changed:
        return
    why = {"prompts": f"it was sampled from other prompts than {layout.prompts_dir(run)} holds now",
           "policy": f"it was sampled from other weights than {layout.policy_path(run, iteration, base)} holds now",
           "rollouts": f"it {'graded' if stage == 'reward' else 'scored'} other rollouts than "
                       f"{layout.rollouts_dir(run, iteration)}",
           "rewards": f"it was trained on other rewards than {layout.rewards_dir(run, iteration)}",
           "teacher": f"its teacher is not {config.model.path} as it is now",
           "signals": f"it was trained on other signals than {layout.signals_dir(run, iteration)}",
           "config": f"it was made with other settings than {layout.run_config_file(run)}",
           "recipe": f"it was made under another recipe than {layout.run_config_file(run)} holds (recipe digest "
                     f"{made.get('recipe_digest', '')[:12]}...)"}
    raise _stale(folder, iteration, "; ".join(why[key] for key in changed))


def link(run: Path, iteration: int, config: RunConfig) -> dict:
    """The fingerprints linking a complete iteration to its policy, every output verified first."""
    stages = stages_for(config)
    for stage in stages:
        if not is_complete(output_dir(run, iteration, stage)):
            raise ArtifactError(f"{output_dir(run, iteration, stage)} is not complete")
        verify_output(run, iteration, stage, config)
    policy = layout.policy_path(run, iteration, resolve_model(config.model))
    names = {"score": "signals", "reward": "rewards"}
    graded = {names[stage]: read_manifest(output_dir(run, iteration, stage))["inputs"]
              for stage in stages if stage in names}
    if "signals" in graded:  # which teacher the signals are: the rubric pass alone, or rubric-guided against a negative
        graded["teacher_guidance"] = {"scale": config.score.guidance, "negative": config.score.guidance_negative
                                      if config.score.guidance else None}
    return {"iteration": iteration, "policy": str(policy), "policy_fingerprint": model_fingerprint(policy),
            "rollouts": read_manifest(layout.rollouts_dir(run, iteration))["inputs"], **graded,
            "checkpoint_fingerprint": model_fingerprint(layout.checkpoint_dir(run, iteration))}
