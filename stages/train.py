"""Stage `train`: the student learns to match the teacher's stored signals, token by token.

    rgsd-pipeline train --run runs/t --iteration 0
    torchrun --nproc-per-node 4 -m rgsd_pipeline train --run-dir runs/t --iteration 0     # data parallel

Trains policy_I (the base model at iteration 0, else iter-(I-1)/checkpoint) on iter-I/signals with the
clipped generalized JSD (or another loss of train.loss) over the teacher's top-k plus a tail bucket,
and writes iter-I/checkpoint/: a plain HF folder (config, safetensors, tokenizer, chat template,
generation config) that transformers and vLLM load directly, with trainer_state/ beside it and
_SUCCESS last. Metrics go to iter-I/metrics.jsonl, one line per optimizer step. Killed, it resumes
from the last saved trainer state and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
import torch
from tqdm import tqdm

from rgsd_pipeline import layout
from rgsd_pipeline.config import ConfigError, fingerprint, load_run_config
from rgsd_pipeline.examples import load_examples
from rgsd_pipeline.models import TOKENIZER_FILES, load_model, load_tokenizer, resolve_model
from rgsd_pipeline.shards import read_stage, write_json_atomic
from rgsd_pipeline.signals import storage_schema
from rgsd_pipeline.trainer import STATE_DIR, Trainer, find_state, full_state_dict, init_world
from schemas import ROLLOUTS


def train(run: Path, iteration: int) -> None:
    # 1. Inputs: the frozen config, rollouts and the signals made from exactly those rollouts, the policy.
    config = load_run_config(run)
    out = layout.checkpoint_dir(run, iteration)
    world = init_world()
    if (out / "_SUCCESS").exists():
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

    # 2. The model (all weights, or LoRA adapters), the optimizer, and any state to resume from.
    torch.manual_seed(config.train.seed)
    model = load_model(policy, config.model.dtype, config.model.trust_remote_code, config.model.allow_pickle_weights)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.lora:
        if config.train.parallel == "fsdp":
            raise ConfigError("train.parallel=fsdp with train.lora=true is not supported; LoRA adapters are small, "
                              "train them with train.parallel=ddp")
        model = with_lora(model, config.train)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model, examples, config.train, world, pad_id)
    start = 0
    state = find_state(out)
    if state is not None:
        start = trainer.load(state)
    elif config.train.carry_optimizer and iteration > 0 and find_state(policy) is not None:
        trainer.load(find_state(policy), load_weights=False)
    metrics_path = layout.iteration_dir(run, iteration) / "metrics.jsonl"
    if world.main:
        keep_metrics(metrics_path, start)
        click.echo(f"train iteration {iteration}: {len(examples)} sequences, {trainer.total_steps} steps of "
                   f"{config.train.batch_size}, {world.size} process(es), from {policy}"
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

    # 4. The checkpoint the next rollout loads: a plain HF folder, then _SUCCESS.
    weights = full_state_dict(model) if trainer.sharded else None  # a collective under FSDP2
    if world.main:
        write_checkpoint(model, policy, out, config.train, {"policy": str(policy),
                                                            "signals": fingerprint(signals.manifest["shards"])},
                         weights)
        click.echo(summary(metrics_path, out))
    if world.size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def with_lora(model, train_config):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise click.ClickException("train.lora needs peft: pip install 'rgsd-pipeline[lora]'") from None
    targets = train_config.lora_target_modules
    lora = LoraConfig(r=train_config.lora_rank, lora_alpha=train_config.lora_alpha,
                      lora_dropout=train_config.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    return get_peft_model(model, lora)


def keep_metrics(path: Path, steps: int) -> None:
    """Drop metric lines past `steps` (written after the last saved state of a killed run)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= steps]
    path.write_text("".join(line + "\n" for line in lines))


def write_checkpoint(model, policy: Path, out: Path, train_config, provenance: dict, weights: dict | None = None) -> None:
    if train_config.lora and not train_config.save_adapters:
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True, state_dict=weights)
    for name in TOKENIZER_FILES:
        if (policy / name).exists():
            shutil.copy2(policy / name, out / name)
    write_json_atomic(out / "rgsd.json", {**provenance, "lora_adapters": bool(train_config.lora and train_config.save_adapters)})
    (out / "_SUCCESS").write_text("")


def summary(metrics_path: Path, out: Path) -> str:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    first, last = rows[0], rows[-1]
    return (f"{len(rows)} steps; divergence {first['divergence']:.4f} -> {last['divergence']:.4f}, "
            f"clip fraction {last['clip_fraction']:.2f}; checkpoint in {out}")


@click.command("train")
@click.option("--run", "--run-dir", "run", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (--run-dir under torchrun, whose own --run-path swallows --run).")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose signals to train on.")
def command(run, iteration):
    """Distil the teacher's signals into the student; writes the next policy."""
    train(run, iteration)
