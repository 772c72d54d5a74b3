"""Stage `rollout`: the student samples on-policy responses to the training prompts.

    rgsd-pipeline rollout --run runs/t --iteration 0
    rgsd-pipeline rollout --run runs/t --iteration 1 --engine hf
    rgsd-pipeline rollout --run runs/t --iteration 0 --num-shards 4 --shard-index 2   # one of 4 workers

The policy is the base model at iteration 0, else iter-(I-1)/checkpoint. The prompts are every training
prompt, or this iteration's slice of them when rollout.prompts_per_iteration is set (see
rgsd_pipeline/sampling.py). Writes iter-I/rollouts/: one row per (prompt_id, sample_idx) with prompt and
response token ids, the log-probs of every sampled token (the model's own, and the distribution it was
drawn from), the text and the finish reason. Each (prompt, sample, iteration) has its own seed, so a
resumed or re-sharded run samples the same tokens. A prompt too long for the context is skipped with the
reason in `finish_reason` (or left-truncated when rollout.too_long=truncate). The recipe itself is
rgsd_pipeline/steps.py `rollout`, which the resident `iterate` runs too.
"""

from __future__ import annotations

import click

from rgsd_pipeline.cli_options import engine_stage_options


@click.command("rollout")
@engine_stage_options
def command(run, iteration, engine_kind, num_shards, shard_index):
    """Sample on-policy student responses to the training prompts."""
    from rgsd_pipeline import steps
    from rgsd_pipeline.engines.hosting import StageEngines

    steps.rollout(run, iteration, StageEngines(engine_kind), num_shards, shard_index)
