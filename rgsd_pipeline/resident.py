"""The resident `iterate`: every step of every iteration in one process per rank, engines and trainer kept.

    rgsd-pipeline iterate --run runs/x --iterations 12                                       # one process
    torchrun --nproc-per-node 8 -m rgsd_pipeline iterate --run-dir runs/x --iterations 12    # 8 GPUs
    srun torchrun --nnodes 2 --nproc-per-node 8 ... iterate --run-dir runs/x ...             # launch/slurm/
    rgsd-pipeline iterate --run runs/x --iterations 12 --ray auto --workers 16               # a Ray cluster

`run_iterations` is the rank function: whichever launcher started the W processes (none, torchrun, Slurm,
Ray Train), each runs it with its `World`. Every rank keeps, for the whole run, its own student engine,
its own teacher (a local engine, or the teacher service), and its part of the trainer (the whole model
under DDP, a shard under FSDP2) with fp32 weights and AdamW state in memory. Per iteration:

    rollout   rank r samples the rollouts shards r, r + W, ...; the main rank writes the manifest
    score     rank r scores the same shard numbers of signals/ (shard j of signals is row-aligned with j)
    train     every rank trains on its share of each global batch; the main rank writes the checkpoint
    sync      every rank's student engine takes the new checkpoint's weights in place

The files are those of the stage commands (shard j of W under the worker contract, one manifest, one
checkpoint, one metrics.jsonl, chain.json), so resume, `inspect`, `evaluate` and `report` do not change. A
complete output is reused only while it was made from the current inputs (rgsd_pipeline/chain.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path

import click

from rgsd_pipeline import layout
from rgsd_pipeline.chain import link, output_dir, stages_for, verify_output
from rgsd_pipeline.distributed import World
from rgsd_pipeline.memory_watch import MemoryWatch
from rgsd_pipeline.models import resolve_model
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import is_complete, write_json_atomic
from rgsd_pipeline.trainer_state import open_writes, wait_for_writes


def run_iterations(run: Path, iterations: int, engine_kind: str | None, world: World) -> dict[str, float]:
    """Complete iterations 0..iterations-1 of a prepared run on this rank; returns seconds spent per stage."""
    from rgsd_pipeline import steps
    from rgsd_pipeline.engines.hosting import ResidentEngines

    config = load_run_config(run)
    engines = ResidentEngines(engine_kind, world)
    watch = MemoryWatch(run, placed(config, engine_kind), world, resolve_model(config.model))
    if gpu_engines_start_first(run, iterations, config):
        engines.start(resolve_model(config.model), config)
    kept = None  # the model and AdamW state the last train step left
    seconds: dict[str, float] = defaultdict(float)
    links = []
    try:
        for iteration in range(iterations):
            iteration_started, ran = time.perf_counter(), False
            for stage in stages_for(config):
                if is_complete(output_dir(run, iteration, stage)):
                    verify_output(run, iteration, stage, config)  # reused only while made from the current inputs
                    click.echo(f"{stage} iteration {iteration}: complete")
                    continue
                click.secho(f"── {stage} iteration {iteration}", bold=True)
                started, ran = time.perf_counter(), True
                with watch.phase(stage):
                    if stage == "rollout":
                        engines.next_weights = kept.exported if kept is not None else None
                        if kept is not None:
                            kept.exported = None  # the engine copies them in; held no longer than that
                        steps.rollout(run, iteration, engines, world=world)
                    elif stage == "score":
                        steps.score(run, iteration, engines, world=world)
                    elif stage == "reward":
                        steps.reward(run, iteration, world=world)
                    else:
                        kept = steps.train(run, iteration, world, kept=kept,
                                           keep_exported=engines.takes_weights_in_memory,
                                           write_state=state_due(iteration, iterations, config))
                seconds[stage] += time.perf_counter() - started
            links.append(link(run, iteration, config))
            if world.main:
                write_json_atomic(layout.chain_file(run), links)
            watch.finish_iteration(iteration)
            if ran:
                click.echo(f"iteration {iteration} took {time.perf_counter() - iteration_started:.1f} s")
        wait_for_writes()  # the last trainer state, written while the last checkpoint was exported
    finally:
        open_writes()  # a write held for an engine that will not load again (the run failed) starts now
        engines.close()
    if seconds:
        spent = ", ".join(f"{stage} {spent:.1f} s" for stage, spent in seconds.items())
        freed = (f"; the student engine's sleeps gave back {max(engines.freed_bytes) / (1 << 30):.2f} GiB at most"
                 if any(engines.freed_bytes) else "")
        click.echo(f"in this process: {spent}; engines started once ({engines.start_seconds:.1f} s), policy weights "
                   f"swapped in place {engines.weight_loads} time(s)" + (f", on each of {world.size} ranks"
                                                                           if world.size > 1 else "") + freed)
    return dict(seconds)


def placed(config, engine_kind: str | None):
    """The config with the engine kind this run uses (`--engine` or the recipe's)."""
    import dataclasses

    from rgsd_pipeline.engines import resolve_kind

    kind = resolve_kind(engine_kind or config.engine.kind)
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, kind=kind))


def gpu_engines_start_first(run: Path, iterations: int, config) -> bool:
    """Whether this run builds its engines before anything else: on a GPU (vLLM's start needs its share of the memory
    free, and a data-parallel job's engines start together), when some iteration still has work to do."""
    import torch

    return torch.cuda.is_available() and any(not is_complete(output_dir(run, i, stage)) for i in range(iterations)
                                             for stage in stages_for(config))


def state_due(iteration: int, iterations: int, config) -> bool:
    """Whether iteration I of a resident run writes its final trainer state: every train.state_every_iterations
    iterations, and at the run's last (what the next `iterate` or `train` starts from). The others stay in memory;
    after a kill they are trained again from their signals (training.can_replay)."""
    return (iteration + 1) % config.train.state_every_iterations == 0 or iteration == iterations - 1


@contextlib.contextmanager
def quiet_unless_main(world: World):
    """Ranks other than the main one print nothing but errors: one rank's progress stands for all."""
    if world.main:
        yield
        return
    from rgsd_pipeline.progress import hide_bars

    hide_bars()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
