"""Command `iterate`: prepare, then (rollout -> score -> train) for N iterations, each stage in its own process.

    rgsd-pipeline iterate --config configs/tiny.yaml --run runs/t --iterations 2
    rgsd-pipeline iterate --run runs/t --iterations 3          # later: one more iteration on the same run

A stage whose output is complete (_SUCCESS) is skipped, so an interrupted `iterate` resumes where it
stopped. After each iteration the fingerprint chain (policy -> rollouts -> signals -> checkpoint) is
checked and written to runs/<name>/chain.json: iteration I's rollouts must come from iteration I-1's
checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from rgsd_pipeline import layout
from rgsd_pipeline.config import load_run_config
from rgsd_pipeline.engines import KINDS
from rgsd_pipeline.models import model_fingerprint, resolve_model
from rgsd_pipeline.shards import ArtifactError, is_complete, read_manifest, write_json_atomic


def run_stage(*args) -> None:
    """One stage in its own process, so nothing lives only in memory between stages."""
    command = [sys.executable, "-m", "rgsd_pipeline", *map(str, args)]
    click.secho(f"$ rgsd-pipeline {' '.join(map(str, args))}", bold=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)


def check_chain(run: Path, iteration: int) -> dict:
    """The fingerprints linking iteration I to its policy; ArtifactError when a link is broken."""
    config = load_run_config(run)
    policy = layout.policy_path(run, iteration, resolve_model(config.model.path))
    rollouts = read_manifest(layout.rollouts_dir(run, iteration))
    signals = read_manifest(layout.signals_dir(run, iteration))
    policy_fingerprint = model_fingerprint(policy)
    if rollouts["inputs"]["policy"] != policy_fingerprint:
        raise ArtifactError(f"{layout.rollouts_dir(run, iteration)} was sampled from another model than {policy}; "
                            "delete it and rerun this iteration")
    return {"iteration": iteration, "policy": str(policy), "policy_fingerprint": policy_fingerprint,
            "rollouts": rollouts["inputs"], "signals": signals["inputs"],
            "checkpoint_fingerprint": model_fingerprint(layout.checkpoint_dir(run, iteration))}


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
    engine = ["--engine", engine_kind] if engine_kind else []
    chain = []
    for iteration in range(iterations):
        for stage, output in (("rollout", layout.rollouts_dir(run, iteration)),
                              ("score", layout.signals_dir(run, iteration)),
                              ("train", layout.checkpoint_dir(run, iteration))):
            if is_complete(output):
                click.echo(f"{stage} iteration {iteration}: complete")
                continue
            run_stage(stage, "--run", run, "--iteration", iteration, *(engine if stage != "train" else []))
        chain.append(check_chain(run, iteration))
        write_json_atomic(layout.chain_file(run), chain)
    click.echo(f"{iterations} iteration(s) complete; the latest policy is {layout.checkpoint_dir(run, iterations - 1)}")
