"""Stage `train`: the student learns to match the teacher's stored signals, token by token.

    rgsd-pipeline train --run runs/t --iteration 0
    torchrun --nproc-per-node 4 -m rgsd_pipeline train --run-dir runs/t --iteration 0     # data parallel

Trains policy_I on iter-I/signals with the clipped generalized JSD (or another loss of train.loss) over the
teacher's top-k plus a tail bucket. Training runs in train.master_dtype (fp32) and continues the previous
iteration's weights, AdamW moments and global step from its trainer state (see
rgsd_pipeline/trainer_state.py). Writes iter-I/checkpoint/: a plain HF folder in model.dtype (config,
safetensors, tokenizer, chat template, generation config) that transformers and vLLM load directly, _SUCCESS
last, and trainer_state/ beside it, written in the background while the checkpoint is exported (a kill before
it is on disk makes the next iteration train this one again from its signals). Metrics go to
iter-I/metrics.jsonl, one line per optimizer step. Killed, it resumes from the last saved trainer state and
ends with the same weights as an uninterrupted run. The recipe itself is rgsd_pipeline/steps.py `train`, which
the resident `iterate` runs too.
"""

from __future__ import annotations

from pathlib import Path

import click

from rgsd_pipeline.cli_options import placement_overrides


@click.command("train")
@click.option("--run", "--run-dir", "run", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (--run-dir under torchrun, whose own --run-path swallows --run).")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose signals to train on.")
@placement_overrides
def command(run, iteration):
    """Distil the teacher's signals into the student; writes the next policy."""
    import torch

    from rgsd_pipeline import steps
    from rgsd_pipeline.trainer import init_world
    from rgsd_pipeline.trainer_state import wait_for_writes

    world = init_world()
    steps.train(run, iteration, world)
    wait_for_writes()  # the final trainer state, written while the checkpoint was exported
    if world.size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
