"""Command `iterate`: prepare, then (rollout -> score -> train) for N iterations, each stage in its own process.

    rgsd-pipeline iterate --config configs/tiny.yaml --run runs/t --iterations 2
    rgsd-pipeline iterate --run runs/t --iterations 3          # later: one more iteration on the same run

A stage whose output is complete (_SUCCESS) is skipped, so an interrupted `iterate` resumes where it
stopped, but only while that output was made from the current inputs (rgsd_pipeline/chain.py): rollouts
sampled from weights that have since changed are refused, naming the folder. After each iteration the
fingerprint chain (policy -> rollouts -> signals -> checkpoint) is written to runs/<name>/chain.json.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from rgsd_pipeline import layout
from rgsd_pipeline.chain import STAGES, link, output_dir, verify_output
from rgsd_pipeline.config import load_run_config
from rgsd_pipeline.engines import KINDS
from rgsd_pipeline.shards import is_complete, write_json_atomic


def run_stage(*args) -> None:
    """One stage in its own process, so nothing lives only in memory between stages."""
    command = [sys.executable, "-m", "rgsd_pipeline", *map(str, args)]
    click.secho(f"$ rgsd-pipeline {' '.join(map(str, args))}", bold=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)


@click.command("iterate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe (first start of a run).")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iterations", required=True, type=click.IntRange(min=1), help="Iterations to complete in total.")
@click.option("--engine", "engine_kind", type=click.Choice(KINDS), help="Engine for rollout and score.")
@click.argument("overrides", nargs=-1)
def command(config_path, run, iterations, engine_kind, overrides):
    """Run prepare and N RGSD iterations, resuming whatever is already complete."""
    if not is_complete(layout.prompts_dir(run)) or config_path:
        run_stage("prepare", *(["--config", config_path] if config_path else []), "--run", run, *overrides)
    config = load_run_config(run)
    engine = ["--engine", engine_kind] if engine_kind else []
    links = []
    for iteration in range(iterations):
        for stage in STAGES:
            if is_complete(output_dir(run, iteration, stage)):
                verify_output(run, iteration, stage, config)  # reused only while made from the current inputs
                click.echo(f"{stage} iteration {iteration}: complete")
                continue
            run_stage(stage, "--run", run, "--iteration", iteration, *(engine if stage != "train" else []))
        links.append(link(run, iteration, config))
        write_json_atomic(layout.chain_file(run), links)
    click.echo(f"{iterations} iteration(s) complete; the latest policy is {layout.checkpoint_dir(run, iterations - 1)}")
