"""The loss of a batch, with the LM head chunked over positions; which loss is the run's loss object's
(rgsd_pipeline/objectives.py).

The student's [T, V] logits are never held for a whole sequence: positions are processed in chunks,
each chunk's LM head + log-softmax + loss runs under activation checkpointing, so only a chunk's
[C, V] exists at once and it is recomputed in backward (all but the last chunk, whose backward runs
first: a micro-batch of one chunk computes its LM head once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rgsd_pipeline.config import TrainConfig


@dataclass(frozen=True)
class LossSpec:
    """The loss settings of a run; `kind` names the loss object (objectives.of) and the rest parameterise it."""

    kind: str = "jsd"  # a name of choices.LOSSES
    beta: float = 0.5
    clip: str = "entry"  # "entry", "soft", "token" or "none" (see losses.py)
    tau: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0  # weight of cross-entropy on the sampled tokens, mixed in
    importance_cap: float = 2.0  # truncation of the importance weight against the behaviour policy (0: none)
    ratio_clip: float = 0.2  # grpo: the ratio is clipped to [1 - ratio_clip, 1 + ratio_clip]
    kl_coef: float = 0.0  # grpo: weight of the k3 estimate of KL(policy || base)
    reward_weight: float = 1.0  # jsd+grpo: weight of the policy-gradient term

    @classmethod
    def of(cls, train_config: TrainConfig) -> LossSpec:
        """The loss settings of a config's `train` section."""
        t = train_config
        return cls(kind=t.loss, beta=t.beta, clip=t.clip, tau=t.tau, temperature=t.distill_temperature,
                   ce_weight=t.ce_weight, importance_cap=t.importance_cap, ratio_clip=t.grpo_clip,
                   kl_coef=t.kl_coef, reward_weight=t.reward_weight)

    @property
    def objective(self):
        """The loss object (rgsd_pipeline/objectives.py)."""
        from rgsd_pipeline.objectives import of

        return of(self.kind)


@dataclass
class Targets:
    """What the loss needs at the N trained positions of a batch (flattened); fields a loss does not read may be
    empty (a policy-gradient loss has no teacher top-k) or None."""

    topk_ids_N_K: torch.Tensor  # int64
    teacher_topk_N_K: torch.Tensor  # fp32 teacher log-probs, as decoded from storage
    teacher_tail_N: torch.Tensor  # fp32 teacher log-mass outside its top-k, exact (measured at score time)
    teacher_token_N: torch.Tensor  # fp32 teacher log-prob of the sampled token
    behaviour_token_N: torch.Tensor | None  # fp32 log-prob of the sampled token under the distribution it was drawn
    # from (the importance weights; None when the rollouts did not record it)
    token_ids_N: torch.Tensor  # int64 sampled token at each position
    weight_N: torch.Tensor  # fp32 reduction weights (see losses.position_weights)
    old_token_N: torch.Tensor | None = None  # fp32 grpo: the trainer's log-prob of the token at the iteration's
    # starting weights (pi_old); None at the first step, where it is the current log-prob
    advantage_N: torch.Tensor | None = None  # fp32 grpo: the rollout's group advantage at each of its tokens
    reference_token_N: torch.Tensor | None = None  # fp32 grpo with kl_coef: the base model's log-prob of the token

    def part(self, rows: slice) -> Targets:
        """The targets of positions `rows` (a chunk)."""
        return Targets(*(None if value is None else value[rows] for value in
                         (getattr(self, name) for name in self.__dataclass_fields__)))


def fp32_logits(hidden_C_H, head_weight_V_H, head_bias) -> torch.Tensor:
    """[C, V] logits of the LM head computed in fp32 (at least), even under bf16 autocast: bf16 logits are rounded to
    1/16 of a nat at logit 10, which moved top-20 log-probs by 0.03 nats on average, the size of tau
    (docs/architecture.md, "Precision")."""
    dtype = torch.promote_types(hidden_C_H.dtype, torch.float32)  # fp32, or a float64 reference's own precision
    with torch.autocast(hidden_C_H.device.type, enabled=False):
        return torch.nn.functional.linear(hidden_C_H.to(dtype), head_weight_V_H.to(dtype),
                                          None if head_bias is None else head_bias.to(dtype))


def _chunk_loss(hidden_C_H, head_weight_V_H, head_bias, targets: Targets, spec: LossSpec, objective):
    logits_C_V = fp32_logits(hidden_C_H, head_weight_V_H, head_bias)
    student_C_V = logits_C_V.log_softmax(-1)
    student_token_C = student_C_V.gather(-1, targets.token_ids_N[:, None])[:, 0]
    loss_C, stats = objective.loss(student_C_V, student_token_C, targets, spec)
    return ((loss_C * targets.weight_N).sum(), torch.stack([stats[name].sum() for name in objective.stats]),
            student_token_C.detach())


def _call(function, *args, use_reentrant=False):
    """`function(*args)`, called like torch.utils.checkpoint.checkpoint but keeping its activations."""
    return function(*args)


def distill_loss(hidden_N_H: torch.Tensor, lm_head: torch.nn.Linear, targets: Targets, spec: LossSpec,
                 chunk_positions: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, the loss object's stats summed, in its `stats` order, the student's fp32 log-prob of each
    sampled token [N], detached) over N positions."""
    objective = spec.objective
    loss = hidden_N_H.new_zeros((), dtype=torch.float32)
    stats = torch.zeros(len(objective.stats), device=hidden_N_H.device)
    student_token_parts = []  # in position order: the chunks run first to last
    positions = hidden_N_H.shape[0]
    # The last chunk's backward runs first, while no other chunk's logits are in memory: keeping its activations
    # costs no more than recomputing them would, so only the chunks before it are recomputed, and the short chunk
    # (the remainder) comes first.
    for hi in reversed(range(positions, 0, -chunk_positions)):
        part = slice(max(hi - chunk_positions, 0), hi)
        recompute = hi < positions
        chunk_loss, chunk_stats, chunk_tokens = (checkpoint if recompute else _call)(
            _chunk_loss, hidden_N_H[part], lm_head.weight, lm_head.bias, targets.part(part), spec, objective,
            use_reentrant=False)
        loss = loss + chunk_loss
        stats += chunk_stats.detach()
        student_token_parts.append(chunk_tokens)
    return loss, stats, torch.cat(student_token_parts) if student_token_parts else hidden_N_H.new_zeros(0)
