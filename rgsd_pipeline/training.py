"""One iteration's training, as the train step runs it: set up, run, export (torchtune's recipe shape).

    session = set_up_training(run, I, world, kept)   inputs, the student, where it starts (starting_point)
    run_training(session)                            optimizer steps, a metrics line each, trainer state
    continuation = export_policy(session, ...)       the checkpoint the next rollout loads, then the final state

The trainer itself (the optimizer step, losses, data-parallel arithmetic) is rgsd_pipeline/trainer.py; the
files a step reads and writes beside a checkpoint are rgsd_pipeline/checkpoints.py and trainer_state.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import polars as pl

from rgsd_pipeline import layout, tracking
from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.fingerprints import fingerprint
from rgsd_pipeline.inputs import train_inputs
from rgsd_pipeline.model_card import write_model_card
from rgsd_pipeline.models import eos_token_ids, load_model, load_tokenizer, pad_token_id, resolve_model
from rgsd_pipeline.recipe import load_run_config, made_under
from rgsd_pipeline.sampling import optimizer_steps_per_epoch
from rgsd_pipeline.shards import ArtifactError, exclusive_lock, is_complete, read_stage, write_text_atomic
from rgsd_pipeline.signals import storage_schema
from schemas import PROMPTS, REWARDS, ROLLOUTS


@dataclass
class Continuation:
    """What a resident process keeps after training iteration `iteration`: the model (master weights) and its
    AdamW optimizer, the same state that iteration's trainer_state/ holds on disk."""

    iteration: int
    model: object
    optimizer: object
    exported: dict | None = None  # the checkpoint's weights in model.dtype, for engines that take them from memory
    reference: object = None  # grpo with train.kl_coef: the frozen base model
    forward: object = None  # the loss module around the model, sharded once under FSDP2 (trainer.DistillForward)


@dataclass
class TrainingSession:
    """Everything one iteration's training works with, built by set_up_training."""

    run: Path
    iteration: int
    config: RunConfig
    world: object
    policy: Path
    trainer: object
    start: int  # the step to start from (after a killed run's last saved state)
    started_from: str  # see starting_point
    replaying: bool = False  # trained again only to rebuild its trainer state: metrics are already on disk

    @property
    def out(self) -> Path:
        return layout.checkpoint_dir(self.run, self.iteration)


def starting_point(run: Path, policy: Path, iteration: int, kept: Continuation | None,
                   replay_depth: int = 1) -> tuple[str, Path | None]:
    """Where iteration I's training starts, in this order, and the trainer state it reads (if any):

    - "resume":   a killed run of this iteration saved a trainer state beside its checkpoint: continue at its step;
    - "memory":   this process trained iteration I-1 and kept its model and AdamW state;
    - "state":    iteration I-1's trainer state on disk (fp32 weights, AdamW moments, global step);
    - "replay":   iteration I-1's checkpoint is complete but its final trainer state is not on disk (a kill landed
                  before it was, or train.state_every_iterations left it in memory): train I-1 again, in memory,
                  from where it can start on disk (replay_iteration), replaying at most `replay_depth` iterations;
    - "exported": iteration I-1's exported weights alone (model.dtype, fresh AdamW moments: warned), or the base
                  model at I = 0.
    """
    from rgsd_pipeline.checkpoints import previous_state
    from rgsd_pipeline.trainer_state import find_state

    if (state := find_state(layout.checkpoint_dir(run, iteration))) is not None:
        return "resume", state
    if kept is not None and kept.iteration == iteration - 1:
        return "memory", None
    if (previous := previous_state(policy, iteration)) is not None:
        return "state", previous
    if iteration > 0 and can_replay(run, iteration - 1, replay_depth):
        return "replay", None
    return "exported", None


def can_replay(run: Path, iteration: int, depth: int = 1) -> bool:
    """Whether iteration I's training can run again from what is on disk, training at most `depth` iterations (I and
    those before it): I starts from an earlier step's state of I, the base model (I = 0) or the final state of I-1,
    else I-1 is replayed first. The trainer states are written so that a kill leaves at most
    train.state_every_iterations iterations to replay (trainer_state.py); a user who deleted more gets the exported
    weights, with a warning, rather than hours of silent retraining."""
    from rgsd_pipeline.checkpoints import previous_state
    from rgsd_pipeline.trainer_state import find_state

    checkpoint, before = layout.checkpoint_dir(run, iteration), layout.checkpoint_dir(run, iteration - 1)
    if find_state(checkpoint) is not None or iteration == 0 or previous_state(before, iteration) is not None:
        return True
    return depth > 1 and is_complete(before) and can_replay(run, iteration - 1, depth - 1)


@contextlib.contextmanager
def training_lock(run: Path, iteration: int, world):
    """Held by the main process while it trains iteration I (its metrics.jsonl, trainer states and checkpoint): a
    second trainer of the same iteration (a `train` beside an `iterate`) is refused at once (shards.LockedError)."""
    if not world.main:
        yield
        return
    with exclusive_lock(layout.train_lock_file(run, iteration), f"iteration {iteration} of {run} (training)"):
        yield


def replay_iteration(run: Path, iteration: int, world) -> Continuation:
    """Iteration I's final trainer state, rebuilt by training I again from its signals (no checkpoint, no metrics
    written: both are on disk), saved beside its checkpoint and kept in memory. Training is deterministic here, so
    the replayed weights must equal the checkpoint's; a difference (a device whose kernels are not) is warned."""
    from rgsd_pipeline.checkpoints import exported_weights, full_state_dict, largest_difference
    from rgsd_pipeline.trainer_state import wait_for_writes

    with training_lock(run, iteration, world):
        session = set_up_training(run, iteration, world, kept=None, replaying=True)
        run_training(session)
        save_final_state(session)
    trainer = session.trainer
    weights = full_state_dict(trainer.model, world.main) if trainer.sharded else None  # a collective under FSDP2
    if world.main and not (session.config.train.lora and session.config.train.save_adapters):
        difference = largest_difference(exported_weights(trainer.model, session.config, weights), session.out)
        if difference > 0:
            click.secho(f"warning: replaying iteration {iteration} did not reproduce {session.out} bit for bit "
                        f"(largest weight difference {difference:.3g}); training continues from the replayed "
                        "state", fg="yellow", err=True)
    wait_for_writes()
    return Continuation(iteration, trainer.model, trainer.optimizer, None, trainer.reference, trainer.forward)


def set_up_training(run: Path, iteration: int, world, kept: Continuation | None,
                    replaying: bool = False) -> TrainingSession:
    """The rollouts and the signals made from exactly them, the student in master precision, and its trainer, placed
    at the starting point. `replaying`: iteration I is trained again only to rebuild its trainer state."""
    import torch

    from rgsd_pipeline.checkpoints import load_student, previous_global_step, previous_state, warn_without_state
    from rgsd_pipeline.examples import load_examples
    from rgsd_pipeline.trainer import Trainer
    from rgsd_pipeline.trainer_state import wait_for_writes

    if kept is None or kept.iteration != iteration - 1:  # else the state being written is one nothing here reads
        wait_for_writes()  # what this process last saved is on disk before anything is read from there
    config = load_run_config(run)
    base = resolve_model(config.model)
    policy = layout.policy_path(run, iteration, base)
    tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS)
    made_from = {"rollouts": fingerprint(rollouts.manifest["shards"])}
    objective = config.train.objective  # what the loss reads: the teacher's signals, a judge's rewards, or both
    signals = read_stage(layout.signals_dir(run, iteration), storage_schema(config.score, len(tokenizer)),
                         expect_inputs=made_from) if objective.reads_signals else None
    rewards = read_stage(layout.rewards_dir(run, iteration), REWARDS,
                         expect_inputs=made_from) if objective.reads_rewards else None
    examples = load_examples(rollouts, signals, config.train.reads_behaviour_logprobs, rewards)
    if not examples:
        raise ArtifactError(f"no trainable tokens in {(signals or rewards).folder}: every rollout was skipped, masked "
                            "or without a reward")

    started_from, state = starting_point(run, policy, iteration, kept, config.train.state_every_iterations)
    if started_from == "replay":
        if world.main:
            click.secho(f"{policy} has no final trainer state (train.state_every_iterations left it in memory, or a "
                        f"kill landed while it was being written): training iteration {iteration - 1} again from its "
                        "signals", fg="yellow", err=True)
        kept, started_from = replay_iteration(run, iteration - 1, world), "memory"
    torch.manual_seed(config.train.seed)
    previous = previous_state(policy, iteration)
    in_memory = started_from == "memory"
    model = kept.model if in_memory else load_student(base, policy, previous, config)
    reference = None
    if objective.needs_reference(config.train):  # the frozen base, for a KL term: in model.dtype, as the engines
        reference = kept.reference if in_memory and kept.reference is not None else \
            load_model(base, config.model.dtype, config.model.trust_remote_code).requires_grad_(False)
    trainer = Trainer(model, examples, config.train, world, pad_token_id(tokenizer, eos_token_ids(policy, tokenizer)),
                      iteration, previous_global_step(policy, previous), schedule_horizon(run, config),
                      optimizer=kept.optimizer if in_memory and config.train.carry_optimizer else None,
                      reference=reference, max_response_tokens=config.rollout.max_new_tokens,
                      forward=kept.forward if in_memory else None)
    start = 0
    if started_from == "state":
        trainer.load(state, load_optimizer=config.train.carry_optimizer)
    elif started_from == "resume" and objective.needs_old_logprobs and previous is not None:
        trainer.load(previous, load_optimizer=False)  # the iteration's starting weights, for pi_old
    elif started_from == "exported" and iteration > 0 and world.main:
        warn_without_state(policy, config)
    trainer.keep_old_logprobs()  # pi_old of the steps after the first, from the weights the iteration starts from
    if started_from == "resume":
        start = trainer.load(state)
    if start == 0:  # the weights are still the policy that sampled these rollouts
        from rgsd_pipeline.engines import resolve_kind
        from rgsd_pipeline.rollout_check import RolloutCheck, gap_limit

        trainer.rollout_check = RolloutCheck(iteration, resolve_kind(config.engine.kind), gap_limit(config),
                                             layout.rollouts_dir(run, iteration))
    if world.main:
        if not replaying:
            truncate_metrics(layout.metrics_file(run, iteration), start)
        click.echo(f"{'replay' if replaying else 'train'} iteration {iteration}: {len(examples)} sequences, "
                   f"{trainer.total_steps} steps of "
                   f"{config.train.batch_size} from global step {trainer.first_global_step}, {world.size} "
                   f"process(es), {config.train.master_dtype} weights, from {policy}"
                   + (" (kept in memory)" if in_memory else "") + (f", resuming at step {start}" if start else ""))
    return TrainingSession(run, iteration, config, world, policy, trainer, start, started_from, replaying)


def run_training(session: TrainingSession) -> None:
    """The optimizer steps from the starting step: a metrics line per step, trainer state every save_every steps
    before the last (written in the background: see trainer_state.py; the last step's is save_final_state's)."""
    from tqdm import tqdm

    trainer, world, config = session.trainer, session.world, session.config
    metrics_path = layout.metrics_file(session.run, session.iteration)
    bar = tqdm(total=trainer.total_steps, initial=session.start, unit="step", disable=not world.main,
               dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 10)
    started = time.perf_counter()
    for step in range(session.start, trainer.total_steps):
        metrics = trainer.step(step)
        if world.main and not session.replaying:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            tracking.log_training(session.run, config, world, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if (step + 1) % config.train.save_every == 0 and step + 1 < trainer.total_steps:
            trainer.save(layout.trainer_state_dir(session.out), step + 1, background=True)  # every process joins
    bar.close()
    if world.main and not session.replaying:
        seconds = time.perf_counter() - started
        click.echo(f"training took {seconds:.1f} s")
        tracking.log_values(session.run, config, world, {"train/seconds": seconds},
                            trainer.first_global_step + trainer.total_steps)


def save_final_state(session: TrainingSession) -> None:
    """The trainer state after the iteration's last step, beside its checkpoint, written in the background while the
    next rollout runs (unless a killed run saved it already). A kill before it is on disk is repaired by the next
    iteration's training (starting_point: "replay")."""
    trainer = session.trainer
    if session.start < trainer.total_steps:
        trainer.save(layout.trainer_state_dir(session.out), trainer.total_steps, background=True)  # every process


def export_policy(session: TrainingSession, keep_exported: bool, write_state: bool = True) -> Continuation:
    """Write the checkpoint (a plain HF folder in model.dtype, then _SUCCESS) from the main process, then the final
    trainer state unless `write_state` is off; every process keeps its model and optimizer for the next iteration."""
    from rgsd_pipeline.checkpoints import exported_weights, full_state_dict, write_checkpoint
    from rgsd_pipeline.trainer_state import hold_writes, prune_states

    trainer, world, config = session.trainer, session.world, session.config
    model = trainer.model
    merged = not (config.train.lora and config.train.save_adapters)  # else the checkpoint holds adapters alone
    in_memory = keep_exported and merged
    keep = merged and (world.main or in_memory)  # a rank whose engine does not take them joins the gathers alone
    dtype = None if config.train.lora else config.model.dtype  # adapters are merged in master precision first
    weights = full_state_dict(model, keep, dtype) if trainer.sharded else None  # a collective under FSDP2
    exported = exported_weights(model, config, weights) if merged and (world.main or in_memory) else None
    if world.main:
        provenance = {"policy": str(session.policy), **train_inputs(session.run, session.iteration, config),
                      "global_step": trainer.first_global_step + trainer.total_steps, **made_under(config)}
        write_checkpoint(model, session.policy, session.out, config, provenance, exported, past_cache=in_memory,
                         card=lambda out: write_model_card(out, session.run, session.iteration, config))
    if write_state:
        if in_memory:  # the write starts once the student's engine has these weights (ResidentEngines.student)
            hold_writes()
        save_final_state(session)  # after the export, so that the export has the disk to itself
    if world.main:
        prune_states(session.run, session.iteration, config.train.keep_states)
        click.echo(train_summary(layout.metrics_file(session.run, session.iteration), session.out))
    world.barrier()  # every rank's engine loads this checkpoint next
    return Continuation(session.iteration, model, trainer.optimizer, exported if in_memory else None,
                        trainer.reference, trainer.forward)


def schedule_horizon(run: Path, config: RunConfig) -> int:
    """Global steps the cosine schedule spans: train.total_steps, else one pass over the training prompts."""
    if config.train.schedule == "constant":
        return 0
    if config.train.total_steps:
        return config.train.total_steps
    prompts = read_stage(layout.prompts_dir(run), PROMPTS).lazy().filter(pl.col("split") == "train")
    return optimizer_steps_per_epoch(prompts.select(pl.len()).collect().item(), config.rollout, config.train)


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl, each checked against schemas.METRICS_*: ArtifactError naming the line."""
    from schemas import (
        METRICS_COMMON,
        METRICS_DISTILL,
        METRICS_HYBRID,
        METRICS_POLICY_GRADIENT,
        METRICS_ROLLOUT_CHECK,
    )

    known = (METRICS_COMMON.keys() | METRICS_DISTILL.keys() | METRICS_POLICY_GRADIENT.keys() | METRICS_HYBRID.keys()
             | METRICS_ROLLOUT_CHECK.keys())
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path} line {number} is not JSON ({err.msg}); delete the iteration's checkpoint "
                                "folder and metrics.jsonl to train it again") from None
        missing, unknown = METRICS_COMMON.keys() - row.keys(), row.keys() - known
        if not isinstance(row, dict) or missing or unknown:
            raise ArtifactError(f"{path} line {number}: fields {sorted(missing)} missing, {sorted(unknown)} unknown "
                                "(schemas.METRICS_*)")
        rows.append(row)
    return rows


def truncate_metrics(path: Path, steps: int) -> None:
    """Drop metric lines past `steps` (written after the last saved state of a killed run)."""
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if row["step"] <= steps]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def train_summary(metrics_path: Path, out: Path) -> str:
    rows = read_metrics(metrics_path)
    first, last = rows[0], rows[-1]
    if "divergence" in last:
        moved = (f"divergence {first['divergence']:.4f} -> {last['divergence']:.4f}, clip fraction "
                 f"{last['clip_fraction']:.2f}")
        if "policy_loss" in last:
            moved += f", GRPO term {first['policy_loss']:.4f} -> {last['policy_loss']:.4f}"
    else:
        moved = f"loss {first['loss']:.4f} -> {last['loss']:.4f}, KL to the base {last['kl_to_base']:.4f}"
    return f"{len(rows)} steps (global step {last['global_step']}); {moved}; checkpoint in {out}"
