"""Where every artifact of a run lives, and how policies are numbered (docs/architecture.md, "Run folder").

    runs/<name>/run.yaml, prompts/, chain.json
    runs/<name>/iter-NNN/{rollouts, signals | rewards, checkpoint, metrics.jsonl, memory.json}
    runs/<name>/eval/<set>/{prompts, quarantine.jsonl, <policy>/{answers, diagnostics.json, verdicts-<judge>,
                                                                  summary-<judge>.json}}
    runs/<name>/eval/judge-cache.sqlite
    runs/<name>/eval/lm-eval/<policy>/results.json

Policy p is the model that samples iteration p: the base model for p = 0, else iteration p-1's checkpoint.
Its label is "base" or "iter-NNN" with NNN = p - 1 (the iteration that trained it). The teacher itself (the
base model reading the rubric) can be evaluated too: label "teacher", number -1, listed first.
"""

from __future__ import annotations

import re
from pathlib import Path

from rgsd_pipeline.shards import ArtifactError, is_complete

BASE_LABEL = "base"
TEACHER_LABEL = "teacher"
TEACHER = -1  # the policy number of the teacher itself
_ITERATION_FOLDER = re.compile(r"iter-(\d{3,})")


def run_config_file(run: Path) -> Path:
    """The resolved config, frozen at the run's first command."""
    return Path(run) / "run.yaml"


def frozen_recipe_file(run: Path) -> Path:
    """The recipe of run.yaml as it was frozen, with its digest: what an edit of run.yaml is named against."""
    return Path(run) / ".run.yaml.frozen"


def train_lock_file(run: Path, iteration: int) -> Path:
    """Held by the one process that trains an iteration: its metrics, trainer state and checkpoint (shards.py)."""
    return iteration_dir(run, iteration) / ".train.lock"


def prompts_dir(run: Path) -> Path:
    return Path(run) / "prompts"


def quarantine_file(run: Path) -> Path:
    return prompts_dir(run) / "quarantine.jsonl"


def chain_file(run: Path) -> Path:
    """The fingerprint chain policy -> rollouts -> signals -> checkpoint of every iteration."""
    return Path(run) / "chain.json"


def tracking_dir(run: Path) -> Path:
    """What train.report_to writes: TensorBoard events, W&B and MLflow folders, run ids, the logged-step cursor."""
    return Path(run) / "tracking"


def ray_storage(run: Path) -> Path:
    """Where Ray Train keeps its own records of an `iterate --ray` job (nothing of ours)."""
    return Path(run) / "ray"


def iteration_dir(run: Path, iteration: int) -> Path:
    return Path(run) / f"iter-{iteration:03d}"


def iterations(run: Path) -> list[int]:
    """The numbers of the iteration folders present, in order."""
    return sorted(int(m.group(1)) for p in Path(run).glob("iter-*") if (m := _ITERATION_FOLDER.fullmatch(p.name)))


def rollouts_dir(run: Path, iteration: int) -> Path:
    return iteration_dir(run, iteration) / "rollouts"


def signals_dir(run: Path, iteration: int) -> Path:
    return iteration_dir(run, iteration) / "signals"


def rewards_dir(run: Path, iteration: int) -> Path:
    """A judge's verdicts and the reward of every rollout (train.loss=grpo), row-aligned with rollouts/."""
    return iteration_dir(run, iteration) / "rewards"


def checkpoint_dir(run: Path, iteration: int) -> Path:
    return iteration_dir(run, iteration) / "checkpoint"


def trainer_state_dir(checkpoint: Path) -> Path:
    """fp32 weights, AdamW moments, step and RNG beside a checkpoint, to continue from (checkpoints.py)."""
    return Path(checkpoint) / "trainer_state"


def trainer_state_lock(state: Path) -> Path:
    """Held while a trainer state is written (beside it, so that its swap never loses it)."""
    return Path(state).with_name(f".{Path(state).name}.lock")


def provenance_file(checkpoint: Path) -> Path:
    """What a checkpoint was trained from (policy, signals, global step, dtype)."""
    return Path(checkpoint) / "rgsd.json"


def model_card_file(folder: Path) -> Path:
    """The model card (the Hub's README.md with its YAML header) of a checkpoint or exported folder."""
    return Path(folder) / "README.md"


def metrics_file(run: Path, iteration: int) -> Path:
    """One JSON line per optimizer step of the iteration."""
    return iteration_dir(run, iteration) / "metrics.jsonl"


def memory_file(run: Path, iteration: int) -> Path:
    """Each phase's measured memory peak beside the memory plan's estimate (rgsd_pipeline/memory_watch.py)."""
    return iteration_dir(run, iteration) / "memory.json"


def policy_label(policy: int) -> str:
    """"base" for policy 0, "teacher" for -1, else "iter-NNN" for the checkpoint of iteration policy - 1."""
    if policy == TEACHER:
        return TEACHER_LABEL
    return BASE_LABEL if policy == 0 else iteration_dir(Path(), policy - 1).name


def policy_index(label: str) -> int | None:
    """The policy number of a label ("base" -> 0, "iter-002" -> 3, "teacher" -> -1); None when it is not one."""
    if label == BASE_LABEL:
        return 0
    if label == TEACHER_LABEL:
        return TEACHER
    match = _ITERATION_FOLDER.fullmatch(label)
    return int(match.group(1)) + 1 if match else None


def policy_path(run: Path, policy: int, base_model: Path) -> Path:
    """The model of policy `policy` (the one that samples iteration `policy`): the base at 0, else the previous
    iteration's checkpoint, which must be complete."""
    if policy == 0:
        return base_model
    checkpoint = checkpoint_dir(run, policy - 1)
    if not is_complete(checkpoint):
        raise ArtifactError(f"iteration {policy} samples from {checkpoint}, which is missing or incomplete; "
                            f"run `rgsd-pipeline train --run {run} --iteration {policy - 1}` first")
    return checkpoint


def eval_root(run: Path) -> Path:
    return Path(run) / "eval"


def eval_set_dir(run: Path, set_name: str) -> Path:
    """One evaluation set: its prompts/ and one folder per evaluated policy (base, iter-000, ...)."""
    return eval_root(run) / set_name


def eval_prompts_dir(run: Path, set_name: str) -> Path:
    return eval_set_dir(run, set_name) / "prompts"


def eval_quarantine_file(run: Path, set_name: str) -> Path:
    return eval_set_dir(run, set_name) / "quarantine.jsonl"


def eval_dir(run: Path, set_name: str, label: str) -> Path:
    return eval_set_dir(run, set_name) / label


def eval_labels(run: Path, set_name: str) -> list[str]:
    """The policies evaluated on a set, in policy order."""
    root = eval_set_dir(run, set_name)
    if not root.exists():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and policy_index(p.name) is not None), key=policy_index)


def answers_dir(run: Path, set_name: str, label: str) -> Path:
    return eval_dir(run, set_name, label) / "answers"


def diagnostics_file(run: Path, set_name: str, label: str) -> Path:
    return eval_dir(run, set_name, label) / "diagnostics.json"


def verdicts_dir(run: Path, set_name: str, label: str, judge: str) -> Path:
    return eval_dir(run, set_name, label) / f"verdicts-{judge}"


def summary_file(run: Path, set_name: str, label: str, judge: str) -> Path:
    return eval_dir(run, set_name, label) / f"summary-{judge}.json"


def summary_judges(folder: Path) -> dict[str, Path]:
    """judge name -> summary file, for every judge that graded the policy evaluated in `folder`."""
    return {p.name[len("summary-"):-len(".json")]: p for p in sorted(Path(folder).glob("summary-*.json"))}


def judge_cache(run: Path) -> Path:
    return eval_root(run) / "judge-cache.sqlite"


def lm_eval_file(run: Path, label: str) -> Path:
    """lm-evaluation-harness results of one policy (`evaluate --lm-eval`), with the tasks and limit they are for."""
    return eval_root(run) / "lm-eval" / label / "results.json"
