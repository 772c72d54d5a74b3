"""Command `iterate`: prepare, then (rollout -> score -> train) for N iterations.

    rgsd-pipeline iterate --config configs/tiny.yaml --run runs/t --iterations 2
    rgsd-pipeline iterate --run runs/t --iterations 3          # later: one more iteration on the same run
    rgsd-pipeline iterate --run runs/t --iterations 3 --per-stage    # each stage in its own process

By default the iterations run in this one process (resident): the student's engine is started once and
takes each new policy's weights in place, the teacher's engine is loaded once, and the trainer keeps the
fp32 model and AdamW state from one iteration to the next (rgsd_pipeline/engines/hosting.py,
rgsd_pipeline/steps.py). `--per-stage` runs every stage as its own `rgsd-pipeline` process instead, as
`make iterate` does. Both write the same artifacts.

A stage whose output is complete (_SUCCESS) is skipped, so an interrupted `iterate` resumes where it
stopped, but only while that output was made from the current inputs (rgsd_pipeline/chain.py): rollouts
sampled from weights that have since changed are refused, naming the folder. After each iteration the
fingerprint chain (policy -> rollouts -> signals -> checkpoint) is written to runs/<name>/chain.json.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import click

from rgsd_pipeline import layout
from rgsd_pipeline.chain import STAGES, link, output_dir, verify_output
from rgsd_pipeline.config import load_run_config
from rgsd_pipeline.engines import KINDS
from rgsd_pipeline.shards import is_complete, write_json_atomic


def run_stage(*args) -> None:
    """One stage in its own process."""
    command = [sys.executable, "-m", "rgsd_pipeline", *map(str, args)]
    click.secho(f"$ rgsd-pipeline {' '.join(map(str, args))}", bold=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)


class Resident:
    """The steps of every iteration in this process, with engines and the trainer's state kept between them."""

    def __init__(self, engine_kind: str | None):
        from rgsd_pipeline.engines.hosting import ResidentEngines

        self.engines = ResidentEngines(engine_kind)
        self.kept = None  # the model and optimizer the last train step left
        self.seconds = defaultdict(float)

    def __call__(self, stage: str, run: Path, iteration: int) -> None:
        from rgsd_pipeline import steps

        click.secho(f"── {stage} iteration {iteration}", bold=True)
        started = time.perf_counter()
        if stage == "rollout":
            steps.rollout(run, iteration, self.engines)
        elif stage == "score":
            steps.score(run, iteration, self.engines)
        else:
            self.kept = steps.train(run, iteration, kept=self.kept)
        self.seconds[stage] += time.perf_counter() - started

    def summary(self) -> str:
        spent = ", ".join(f"{stage} {self.seconds[stage]:.1f} s" for stage in STAGES if stage in self.seconds)
        return (f"in this process: {spent}; engines started once ({self.engines.start_seconds:.1f} s), policy weights "
                f"swapped in place {self.engines.weight_loads} time(s)")

    def close(self) -> None:
        self.engines.close()


@click.command("iterate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe (first start of a run).")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iterations", required=True, type=click.IntRange(min=1), help="Iterations to complete in total.")
@click.option("--engine", "engine_kind", type=click.Choice(KINDS), help="Engine for rollout and score.")
@click.option("--per-stage", is_flag=True, help="Run each stage as its own process instead of one resident process.")
@click.argument("overrides", nargs=-1)
def command(config_path, run, iterations, engine_kind, per_stage, overrides):
    """Run prepare and N RGSD iterations, resuming whatever is already complete."""
    if not is_complete(layout.prompts_dir(run)) or config_path:
        run_stage("prepare", *(["--config", config_path] if config_path else []), "--run", run, *overrides)
    config = load_run_config(run)
    engine = ["--engine", engine_kind] if engine_kind else []
    resident = None if per_stage else Resident(engine_kind)
    links = []
    try:
        for iteration in range(iterations):
            for stage in STAGES:
                if is_complete(output_dir(run, iteration, stage)):
                    verify_output(run, iteration, stage, config)  # reused only while made from the current inputs
                    click.echo(f"{stage} iteration {iteration}: complete")
                elif resident is not None:
                    resident(stage, run, iteration)
                else:
                    run_stage(stage, "--run", run, "--iteration", iteration, *(engine if stage != "train" else []))
            links.append(link(run, iteration, config))
            write_json_atomic(layout.chain_file(run), links)
    finally:
        if resident is not None:
            resident.close()
    if resident is not None and resident.seconds:
        click.echo(resident.summary())
    click.echo(f"{iterations} iteration(s) complete; the latest policy is {layout.checkpoint_dir(run, iterations - 1)}")
