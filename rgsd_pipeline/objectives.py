"""Training losses as objects: what each reads from the run, its per-position forward, and its metrics.

Every loss `train.loss` names is one object, registered by name in `choices.LOSSES` and looked up with `of`:

    reads_signals / reads_rewards   which graded stage outputs it trains on (iter-I/signals/, iter-I/rewards/),
                                    and so which steps an iteration runs (chain.stages_for) and which outputs
                                    a checkpoint is made from (inputs.train_inputs)
    reads_behaviour(train)          whether it reads the rollouts' behaviour log-probs (sampling_logprobs), which
                                    the rollout then records
    needs_reference(train)          whether the trainer holds the frozen base model beside the policy
    needs_old_logprobs              whether the trainer keeps each sampled token's log-prob under the iteration's
                                    starting weights (pi_old) for the steps after the first
    check(config)                   refuses settings it cannot train with, naming them
    loss(...)                       per position of a chunk: the loss and the per-position values its metrics sum
    metrics(sums, tokens)           the metrics.jsonl fields it reports (schemas.METRICS_*)

The trainer, the chunked LM head (distill.py) and every stage read only these, so adding a loss is its object
(in its own module), its name in choices.LOSSES, a float64 test of its forward and a line of docs
(docs/architecture.md, "Adding a loss"). `Composite` adds the losses of existing objects, weighted: the hybrid
`jsd+grpo` is RGSD's divergence plus train.reward_weight times GRPO's term on the same rollouts.

Nothing here imports torch at module level: config.py and chain.py read the objects' needs.
"""

from __future__ import annotations

import importlib

from rgsd_pipeline.choices import LOSSES


class Objective:
    """What every loss object answers; the defaults are a loss that reads teacher signals and nothing else."""

    name: str = ""
    reads_signals: bool = True
    reads_rewards: bool = False
    needs_old_logprobs: bool = False
    min_samples_per_prompt: int = 1
    stats: tuple[str, ...] = ()  # names of the per-position values loss() returns, summed over a batch

    def reads_behaviour(self, train) -> bool:
        """Whether the loss reads each sampled token's log-prob under the distribution it was drawn from."""
        return False

    def needs_reference(self, train) -> bool:
        """Whether the trainer must hold the frozen base model (a KL term to it)."""
        return False

    def check(self, config) -> None:
        """Raise ConfigError for settings this loss cannot train with."""
        if config.rollout.samples_per_prompt < self.min_samples_per_prompt:
            from rgsd_pipeline.config import ConfigError

            raise ConfigError(f"train.loss={self.name} needs rollout.samples_per_prompt >= "
                              f"{self.min_samples_per_prompt}: its advantages compare the samples of one prompt "
                              "(the paper's baseline samples 16)")

    def loss(self, student_C_V, student_token_C, targets, spec) -> tuple:
        """(loss_C, {stat: values_C}) at the C positions of a chunk: `student_C_V` the student's fp32 log-softmax,
        `student_token_C` its log-prob of the sampled token, `targets` the chunk's distill.Targets, `spec` the
        run's distill.LossSpec. The caller weights loss_C by targets.weight_N and sums the stats."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        """The metrics.jsonl fields of one optimizer step from the stats summed over its global batch."""
        raise NotImplementedError


class Composite(Objective):
    """The weighted sum of existing losses on the same positions: each part reads what it reads, reports its own
    metrics, and `<part>_loss` its (unweighted) share. `weights` name LossSpec fields (None: 1)."""

    def __init__(self, name: str, parts: tuple[tuple[Objective, str | None, str], ...]):
        self.name, self.parts = name, parts  # (objective, the LossSpec field weighting it, what its loss is called)
        self.reads_signals = any(part.reads_signals for part, _, _ in parts)
        self.reads_rewards = any(part.reads_rewards for part, _, _ in parts)
        self.needs_old_logprobs = any(part.needs_old_logprobs for part, _, _ in parts)
        self.min_samples_per_prompt = max(part.min_samples_per_prompt for part, _, _ in parts)
        self.stats = tuple(dict.fromkeys(s for part, _, _ in parts for s in part.stats)) + tuple(
            label for _, _, label in parts)

    def reads_behaviour(self, train) -> bool:
        return any(part.reads_behaviour(train) for part, _, _ in self.parts)

    def needs_reference(self, train) -> bool:
        return any(part.needs_reference(train) for part, _, _ in self.parts)

    def check(self, config) -> None:
        super().check(config)  # named as this loss, before the parts' own checks
        for part, _, _ in self.parts:
            part.check(config)

    def loss(self, student_C_V, student_token_C, targets, spec):
        total_C, stats = 0.0, {}
        for part, weight, label in self.parts:
            part_C, part_stats = part.loss(student_C_V, student_token_C, targets, spec)
            stats.update(part_stats)
            stats[label] = (part_C * targets.weight_N).detach()  # its share of the reduced loss, unweighted
            total_C = total_C + (getattr(spec, weight) if weight else 1.0) * part_C
        return total_C, stats

    def metrics(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        out = {}
        for part, _, label in self.parts:
            out.update(part.metrics(sums, tokens))
            out[label] = sums[label]
        return out


def of(name: str) -> Objective:
    """The loss object `train.loss` names (choices.LOSSES)."""
    if name not in LOSSES:
        raise ValueError(f"train.loss must be one of {', '.join(LOSSES)}; got {name!r}")
    module, _, attribute = LOSSES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
