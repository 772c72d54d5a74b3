"""Stage `score`: the rubric-conditioned teacher's top-k log-probs over the student's own tokens.

    rgsd-pipeline score --run runs/t --iteration 0
    rgsd-pipeline score --run runs/t --iteration 0 --engine hf --num-shards 4 --shard-index 1

The teacher is always the run's base model. Its input is the teacher prompt (rubric template, chat
template, generation prompt) followed by the student's response token ids exactly as sampled, never
re-tokenized. Writes iter-I/signals/, row-aligned 1:1 with iter-I/rollouts/: per response position
the teacher's top-k ids and log-probs, the exact log-mass outside its top-k, its log-prob of the sampled
token, and the loss mask. The recipe itself is rgsd_pipeline/steps.py `score`, which the resident
`iterate` runs too.
"""

from __future__ import annotations

import click

from rgsd_pipeline.cli_options import engine_stage_options


@click.command("score")
@engine_stage_options
def command(run, iteration, engine_kind, num_shards, shard_index):
    """Score the student's rollouts with the rubric-conditioned teacher."""
    from rgsd_pipeline import steps
    from rgsd_pipeline.engines.hosting import StageEngines

    steps.score(run, iteration, StageEngines(engine_kind), num_shards, shard_index)
