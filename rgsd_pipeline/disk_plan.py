"""What a resident iteration writes to disk, how long that takes, and an estimate of the iteration's time beside it.

Written per iteration: the checkpoint the next rollout loads (every iteration, model.dtype), the rollouts and
signals shards, and the trainer state (fp32 master weights and AdamW's two moments, 12 bytes a trainable parameter)
every train.state_every_iterations iterations. At paper scale the state dominates: a 7B model's is ~91 GB, which at
a shared file system's 1-2 GB/s takes longer than the iteration it follows.

The iteration's time is an estimate from the shapes, with the assumptions printed beside it (`ASSUMED`): sampling is
bound by reading the weights once per decode step (the batch decodes together, so the longest response sets the
number of steps), scoring and training by FLOPs (2 and 6 per parameter and token; 8 with gradient checkpointing)
at a model-FLOPs utilisation, and the checkpoint write by the disk. The recipes choose state_every_iterations so
that state writes stay under `STATE_SHARE` of the iterations they cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.memory_plan import DTYPE_BYTES, Launch, Shape

STATE_SHARE = 0.10
ROLLOUT_BYTES_PER_TOKEN = 8  # token id and behaviour log-prob
SIGNAL_BYTES_PER_ENTRY = 8  # candidate id and teacher log-prob per (token, k), before Parquet's compression


@dataclass(frozen=True)
class Device:
    """The accelerator the estimate assumes (an H100 SXM by default)."""

    name: str = "H100 SXM"
    bf16_flops: float = 989e12  # dense
    memory_bytes_per_s: float = 3.35e12
    train_mfu: float = 0.35
    score_mfu: float = 0.5


@dataclass(frozen=True)
class IterationTime:
    sampling: float
    scoring: float
    training: float
    checkpoint: float

    @property
    def total(self) -> float:
        return self.sampling + self.scoring + self.training + self.checkpoint


def state_bytes(shape: Shape, config: RunConfig) -> int:
    """A trainer state's bytes: master weights and two AdamW moments of every trainable parameter."""
    train = config.train
    trainable = 2 * train.lora_rank * shape.layers * 7 * shape.hidden if train.lora else shape.parameters
    return trainable * 3 * DTYPE_BYTES[train.master_dtype]


def written_per_iteration(shape: Shape, config: RunConfig) -> dict[str, int]:
    """Bytes an iteration writes, by what (the state only when it is due)."""
    rows = config.rollout.prompts_per_iteration * config.rollout.samples_per_prompt
    tokens = rows * config.rollout.max_new_tokens // 2  # a response's mean length taken as half the longest
    return {"checkpoint": shape.parameters * DTYPE_BYTES[config.model.dtype],
            "rollouts": tokens * ROLLOUT_BYTES_PER_TOKEN,
            "signals": tokens * config.score.top_k * SIGNAL_BYTES_PER_ENTRY,
            "state": state_bytes(shape, config)}


def iteration_time(shape: Shape, config: RunConfig, launch: Launch, disk_bytes_per_s: float,
                   device: Device = Device()) -> IterationTime:
    """Seconds of one iteration on `launch`, estimated as the module says (the state write left out)."""
    rows_per_rank = math.ceil(config.rollout.prompts_per_iteration * config.rollout.samples_per_prompt / launch.ranks)
    prompt = min(512, config.model.max_model_len - config.rollout.max_new_tokens)  # a rubric prompt's typical length
    tokens_per_rank = rows_per_rank * (prompt + config.rollout.max_new_tokens // 2)
    weights = shape.parameters * DTYPE_BYTES[config.model.dtype]
    per_step = weights / config.engine.vllm_tensor_parallel_size / device.memory_bytes_per_s
    sampling = config.rollout.max_new_tokens * per_step
    scoring = 2 * shape.parameters * tokens_per_rank / (device.bf16_flops * device.score_mfu)
    per_token = 8 if config.train.gradient_checkpointing else 6
    flops = config.train.epochs * per_token * shape.parameters * tokens_per_rank
    training = flops / (device.bf16_flops * device.train_mfu)
    return IterationTime(sampling, scoring, training, weights / disk_bytes_per_s)


def state_every(shape: Shape, config: RunConfig, launch: Launch, disk_bytes_per_s: float) -> int:
    """The fewest iterations between trainer states for which writing one stays under STATE_SHARE of their time."""
    seconds = iteration_time(shape, config, launch, disk_bytes_per_s).total
    return max(1, math.ceil(state_bytes(shape, config) / disk_bytes_per_s / (STATE_SHARE * seconds)))


def describe(shape: Shape, config: RunConfig, launch: Launch, disk_gbps: float, device: Device = Device()) -> str:
    """The disk writes and time estimate as text, with a note when the recipe's state cadence is too frequent."""
    rate = disk_gbps * 1e9
    written = written_per_iteration(shape, config)
    estimate = iteration_time(shape, config, launch, rate, device)
    every = config.train.state_every_iterations
    state_seconds = written["state"] / rate
    lines = [
        f"disk per iteration at {disk_gbps:g} GB/s (--disk-gbps):",
        *(f"  {what:11s}{size / 1e9:9.2f} GB {size / rate:8.1f} s" + (f"   every {every} iteration(s)"
                                                                       if what == "state" else "")
          for what, size in written.items()),
        f"iteration time, estimated on {launch.ranks} x {device.name} (bf16 {device.bf16_flops / 1e12:.0f} TFLOP/s, "
        f"{device.memory_bytes_per_s / 1e12:.2f} TB/s; MFU {device.train_mfu:g} training, {device.score_mfu:g} "
        "scoring; decode bound by weight reads; mean response half of max_new_tokens):",
        f"  sampling {estimate.sampling:.1f} s, scoring {estimate.scoring:.1f} s, training {estimate.training:.1f} s, "
        f"checkpoint write {estimate.checkpoint:.1f} s: {estimate.total:.1f} s",
    ]
    share = state_seconds / (every * estimate.total)
    needed = state_every(shape, config, launch, rate)
    lines.append(f"  trainer state writes take {share:.0%} of the iterations they follow"
                 + (f" (over {STATE_SHARE:.0%}: set train.state_every_iterations to {needed} or more; a kill then "
                    "retrains at most that many iterations from their signals)" if share > STATE_SHARE else ""))
    return "\n".join(lines)
