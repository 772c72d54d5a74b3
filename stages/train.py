"""Stage `train`: the student learns to match the teacher's stored signals, token by token.

    rgsd-pipeline train --run runs/t --iteration 0
    torchrun --nproc-per-node 4 -m rgsd_pipeline train --run-dir runs/t --iteration 0     # data parallel

Trains policy_I on iter-I/signals with the clipped generalized JSD (or another loss of train.loss) over
the teacher's top-k plus a tail bucket. Training runs in train.master_dtype (fp32) and continues the
previous iteration's weights, AdamW moments and global step from its trainer state (see
rgsd_pipeline/checkpoints.py). Writes iter-I/checkpoint/: a plain HF folder in model.dtype (config,
safetensors, tokenizer, chat template, generation config) that transformers and vLLM load directly,
with trainer_state/ beside it and _SUCCESS last. Metrics go to iter-I/metrics.jsonl, one line per
optimizer step. Killed, it resumes from the last saved trainer state and ends with the same weights as
an uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import polars as pl
import torch
from tqdm import tqdm

from rgsd_pipeline import layout
from rgsd_pipeline.checkpoints import (
    load_student,
    previous_global_step,
    previous_state,
    prune_states,
    warn_without_state,
    write_checkpoint,
)
from rgsd_pipeline.config import RunConfig, fingerprint, load_run_config
from rgsd_pipeline.examples import load_examples
from rgsd_pipeline.models import eos_token_ids, load_tokenizer, pad_token_id, resolve_model
from rgsd_pipeline.sampling import optimizer_steps_per_epoch
from rgsd_pipeline.shards import is_complete, read_stage, write_text_atomic
from rgsd_pipeline.signals import storage_schema
from rgsd_pipeline.trainer import STATE_DIR, Trainer, find_state, full_state_dict, init_world
from schemas import PROMPTS, ROLLOUTS


def train(run: Path, iteration: int) -> None:
    # 1. Inputs: the frozen config, rollouts and the signals made from exactly those rollouts, the policy.
    config = load_run_config(run)
    out = layout.checkpoint_dir(run, iteration)
    world = init_world()
    if is_complete(out):
        if world.main:
            click.echo(f"checkpoint already complete in {out}")
        return
    base = resolve_model(config.model.path)
    policy = layout.policy_path(run, iteration, base)
    tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS)
    signals = read_stage(layout.signals_dir(run, iteration), storage_schema(config.score, len(tokenizer)),
                         expect_inputs={"rollouts": fingerprint(rollouts.manifest["shards"])})
    examples = load_examples(rollouts, signals)
    if not examples:
        raise click.ClickException(f"no trainable tokens in {signals.folder}: every rollout was skipped or masked")

    # 2. The student in master precision, continuing the previous iteration's trainer state.
    torch.manual_seed(config.train.seed)
    previous = previous_state(policy, iteration)
    model = load_student(base, policy, previous, config)
    trainer = Trainer(model, examples, config.train, world, pad_token_id(tokenizer, eos_token_ids(policy, tokenizer)),
                      iteration, previous_global_step(policy, previous), schedule_horizon(run, config))
    start = 0
    if (state := find_state(out)) is not None:
        start = trainer.load(state)
    elif previous is not None:
        trainer.load(previous, load_optimizer=config.train.carry_optimizer)
    elif iteration > 0 and world.main:
        warn_without_state(policy, config)
    metrics_path = layout.metrics_file(run, iteration)
    if world.main:
        keep_metrics(metrics_path, start)
        click.echo(f"train iteration {iteration}: {len(examples)} sequences, {trainer.total_steps} steps of "
                   f"{config.train.batch_size} from global step {trainer.first_global_step}, {world.size} "
                   f"process(es), {config.train.master_dtype} weights, from {policy}"
                   + (f", resuming at step {start}" if start else ""))

    # 3. Optimizer steps; metrics every step, trainer state every save_every steps.
    bar = tqdm(total=trainer.total_steps, initial=start, unit="step", disable=not world.main, dynamic_ncols=True,
               mininterval=0.2 if sys.stderr.isatty() else 10)
    for step in range(start, trainer.total_steps):
        metrics = trainer.step(step)
        if world.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", div=f"{metrics['divergence']:.4f}", refresh=False)
        if (step + 1) % config.train.save_every == 0 or step + 1 == trainer.total_steps:
            trainer.save(out / STATE_DIR, step + 1)  # every process joins: FSDP2 gathers the weights
    bar.close()

    # 4. The checkpoint the next rollout loads: a plain HF folder in model.dtype, then _SUCCESS.
    weights = full_state_dict(model) if trainer.sharded else None  # a collective under FSDP2
    if world.main:
        provenance = {"policy": str(policy), "signals": fingerprint(signals.manifest["shards"]),
                      "global_step": trainer.first_global_step + trainer.total_steps}
        write_checkpoint(model, policy, out, config, provenance, weights)
        prune_states(run, iteration, config.train.keep_states)
        click.echo(summary(metrics_path, out))
    if world.size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def schedule_horizon(run: Path, config: RunConfig) -> int:
    """Global steps the cosine schedule spans: train.total_steps, else one pass over the training prompts."""
    if config.train.schedule == "constant":
        return 0
    if config.train.total_steps:
        return config.train.total_steps
    prompts = read_stage(layout.prompts_dir(run), PROMPTS).lazy().filter(pl.col("split") == "train")
    return optimizer_steps_per_epoch(prompts.select(pl.len()).collect().item(), config.rollout, config.train)


def keep_metrics(path: Path, steps: int) -> None:
    """Drop metric lines past `steps` (written after the last saved state of a killed run)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= steps]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def summary(metrics_path: Path, out: Path) -> str:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    first, last = rows[0], rows[-1]
    return (f"{len(rows)} steps (global step {last['global_step']}); divergence {first['divergence']:.4f} -> "
            f"{last['divergence']:.4f}, clip fraction {last['clip_fraction']:.2f}; checkpoint in {out}")


@click.command("train")
@click.option("--run", "--run-dir", "run", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (--run-dir under torchrun, whose own --run-path swallows --run).")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose signals to train on.")
def command(run, iteration):
    """Distil the teacher's signals into the student; writes the next policy."""
    train(run, iteration)
