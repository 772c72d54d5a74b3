"""Stage `reward`: a judge grades every rollout of an iteration (the judge-based baseline, train.loss=grpo).

    rgsd-pipeline reward --run runs/g --iteration 0
    rgsd-pipeline reward --run runs/g --iteration 0 --num-shards 4 --shard-index 1   # one of 4 workers

RGSD never calls a judge in training; this stage exists for the baseline the paper compares it with:
GRPO driven by judge rewards. The judge is reward.judge: `rules` (the machine-checkable predicates in the
criteria's tags, no model) or `llm` (an OpenAI-compatible judge at reward.judge_url, verdicts cached in
eval/judge-cache.sqlite, bounded concurrency, retries). Writes iter-I/rewards/: one row per rollout,
row-aligned with iter-I/rollouts/, with each criterion's verdict and the rollout's reward (met points, met
pitfalls subtracted, over the positive points graded: what `evaluate` scores an answer). Resumable shard by
shard; a shard whose judge calls fail is not written, and a rerun asks the judge only for what is missing.
The recipe itself is rgsd_pipeline/steps.py `reward`, which the resident `iterate` runs too.
"""

from __future__ import annotations

from pathlib import Path

import click

from rgsd_pipeline.cli_options import placement_overrides


@click.command("reward")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose rollouts to grade.")
@click.option("--num-shards", default=1, type=click.IntRange(min=1), help="Independent workers splitting the stage.")
@click.option("--shard-index", default=0, type=click.IntRange(min=0), help="This worker's index in [0, num-shards).")
@placement_overrides
def command(run, iteration, num_shards, shard_index):
    """Grade every rollout with a judge (the GRPO baseline); writes iter-I/rewards/."""
    from rgsd_pipeline import steps

    steps.reward(run, iteration, num_shards, shard_index)
