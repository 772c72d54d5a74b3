"""Command-line options shared by the engine stages (rollout, score)."""

from __future__ import annotations

from pathlib import Path

import click

from rgsd_pipeline.engines import KINDS


def engine_stage_options(command):
    """--run, --iteration, --engine and the --num-shards / --shard-index split of a stage across workers."""
    options = [
        click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder."),
        click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration to work on."),
        click.option("--engine", "engine_kind", type=click.Choice(KINDS), help="Override the config's engine."),
        click.option("--num-shards", default=1, type=click.IntRange(min=1), help="Independent workers splitting the stage."),
        click.option("--shard-index", default=0, type=click.IntRange(min=0), help="This worker's index in [0, num-shards)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
