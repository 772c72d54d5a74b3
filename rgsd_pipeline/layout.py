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
