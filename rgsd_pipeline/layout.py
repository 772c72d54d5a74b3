"""Where every artifact of a run lives (DESIGN.md §3)."""

from __future__ import annotations

from pathlib import Path


def prompts_dir(run: Path) -> Path:
    return Path(run) / "prompts"


def quarantine_file(run: Path) -> Path:
    return prompts_dir(run) / "quarantine.jsonl"


def iteration_dir(run: Path, iteration: int) -> Path:
    return Path(run) / f"iter-{iteration:03d}"


def rollouts_dir(run: Path, iteration: int) -> Path:
    return iteration_dir(run, iteration) / "rollouts"


def signals_dir(run: Path, iteration: int) -> Path:
    return iteration_dir(run, iteration) / "signals"


def checkpoint_dir(run: Path, iteration: int) -> Path:
    return iteration_dir(run, iteration) / "checkpoint"


def metrics_file(run: Path, iteration: int) -> Path:
    """One JSON line per optimizer step of the iteration."""
    return iteration_dir(run, iteration) / "metrics.jsonl"


def policy_path(run: Path, iteration: int, base_model: Path) -> Path:
    """The model that samples iteration `iteration`: the base at 0, else the previous iteration's checkpoint."""
    from rgsd_pipeline.shards import ArtifactError

    if iteration == 0:
        return base_model
    checkpoint = checkpoint_dir(run, iteration - 1)
    if not (checkpoint / "_SUCCESS").exists():
        raise ArtifactError(f"iteration {iteration} samples from {checkpoint}, which is missing or incomplete; "
                            f"run `rgsd-pipeline train --run {run} --iteration {iteration - 1}` first")
    return checkpoint


def eval_root(run: Path) -> Path:
    return Path(run) / "eval"


def eval_set_dir(run: Path, set_name: str) -> Path:
    """One evaluation set: its prompts/ and one folder per evaluated policy (base, iter-000, ...)."""
    return eval_root(run) / set_name


def eval_dir(run: Path, set_name: str, label: str) -> Path:
    return eval_set_dir(run, set_name) / label


def judge_cache(run: Path) -> Path:
    return eval_root(run) / "judge-cache.sqlite"
