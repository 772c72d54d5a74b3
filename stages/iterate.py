"""Command `iterate`: prepare, then (rollout -> score -> train) for N iterations.

    rgsd-pipeline iterate --config configs/tiny.yaml --run runs/t --iterations 2
    rgsd-pipeline iterate --run runs/t --iterations 3          # later: one more iteration on the same run
    rgsd-pipeline iterate --run runs/t --iterations 3 --per-stage    # each stage in its own process
    torchrun --nproc-per-node 8 -m rgsd_pipeline iterate --run-dir runs/t --iterations 3   # 8 ranks
    rgsd-pipeline iterate --run runs/t --iterations 3 --ray auto --workers 8 --gpus-per-worker 1

By default the iterations run resident (rgsd_pipeline/resident.py): one process per rank runs every
step, the student's engine starts once and takes each new policy's weights in place, the teacher's
engine is loaded once, and the trainer keeps its fp32 model and AdamW state from one iteration to the
next. Started by torchrun (or `srun torchrun` on Slurm, or Ray Train with `--ray`), every rank samples
and scores its share of the shards and trains its share of each batch. `--per-stage` runs every stage
as its own `rgsd-pipeline` process instead, as `make iterate` does. All paths write the same artifacts.

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
from rgsd_pipeline.chain import link, output_dir, stages_for, verify_output
from rgsd_pipeline.cli_options import engine_placement
from rgsd_pipeline.engines import KINDS
from rgsd_pipeline.recipe import command_config, load_run_config, placement_of, use_placement
from rgsd_pipeline.shards import is_complete, write_json_atomic


def run_stage(*args) -> None:
    """One stage in its own process."""
    command = [sys.executable, "-m", "rgsd_pipeline", *map(str, args)]
    click.secho(f"$ rgsd-pipeline {' '.join(map(str, args))}", bold=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)


def run_per_stage(run: Path, iterations: int, engine_kind: str | None) -> None:
    """Every stage of every iteration as its own process."""
    config = load_run_config(run)
    engine = ["--engine", engine_kind] if engine_kind else []
    links = []
    for iteration in range(iterations):
        for stage in stages_for(config):
            if is_complete(output_dir(run, iteration, stage)):
                verify_output(run, iteration, stage, config)  # reused only while made from the current inputs
                click.echo(f"{stage} iteration {iteration}: complete")
            else:
                run_stage(stage, "--run", run, "--iteration", iteration,
                          *(engine if stage in ("rollout", "score") else []))
        links.append(link(run, iteration, config))
        write_json_atomic(layout.chain_file(run), links)


@click.command("iterate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe (first start of a run).")
@click.option("--run", "--run-dir", "run", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (--run-dir under torchrun, whose own --run-path swallows --run).")
@click.option("--iterations", required=True, type=click.IntRange(min=1), help="Iterations to complete in total.")
@click.option("--engine", "engine_kind", type=click.Choice(KINDS), help="Engine for rollout and score.")
@click.option("--per-stage", is_flag=True, help="Run each stage as its own process instead of one resident process.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run the ranks as Ray Train workers on this cluster: auto, host:port, or local (a cluster of this "
                   "machine alone, bound to 127.0.0.1).")
@click.option("--workers", default=1, type=click.IntRange(min=1), show_default=True, help="Ranks with --ray.")
@click.option("--gpus-per-worker", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="GPUs per rank with --ray (0: CPU workers).")
@click.option("--cpus-per-worker", default=1.0, type=click.FloatRange(min=0.5), show_default=True,
              help="CPUs per rank with --ray.")
@click.argument("overrides", nargs=-1)
def command(config_path, run, iterations, engine_kind, per_stage, ray_address, workers, gpus_per_worker,
            cpus_per_worker, overrides):
    """Run prepare and N RGSD iterations, resuming whatever is already complete."""
    from rgsd_pipeline.distributed import init_world, leave_world

    world = init_world()  # rank r of W under torchrun; rank 0 of 1 alone (and for the Ray driver)
    # prepare also checks a config or overrides given for a run that exists against its run.yaml (not ignored)
    if world.main and (not is_complete(layout.prompts_dir(run)) or config_path or overrides):
        run_stage("prepare", *(["--config", config_path] if config_path else []), "--run", run, *overrides)
    world.barrier()
    # The recipe is run.yaml's (prepare checked what was given against it); the placement is this command's.
    use_placement({**placement_of(command_config(run, config_path, list(overrides))), **engine_placement(engine_kind)})
    if per_stage:
        if world.size > 1 or ray_address:
            raise click.UsageError("--per-stage runs one process per stage; start it without torchrun or --ray")
        run_per_stage(run, iterations, engine_kind)
    elif ray_address:
        from rgsd_pipeline.launch_ray import run_on_ray

        run_on_ray(ray_address, run, iterations, engine_kind, workers, gpus_per_worker, cpus_per_worker)
    else:
        import torch

        from rgsd_pipeline.resident import quiet_unless_main, run_iterations

        if torch.cuda.is_available():  # refused now, with the arithmetic, rather than out of memory in an hour
            from rgsd_pipeline.memory_plan import check_this_launch

            plan = check_this_launch(load_run_config(run), world)
            if world.main:
                click.echo(plan)
        with quiet_unless_main(world):
            run_iterations(run, iterations, engine_kind, world)
        leave_world(world)
    if world.main:
            click.echo(f"{iterations} iteration(s) complete; the latest policy is "
                   f"{layout.checkpoint_dir(run, iterations - 1)}")
