"""The student's distillation loss on a batch, with the LM head chunked over positions.

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
from rgsd_pipeline.losses import (
    distill_per_token,
    importance_weights,
    sampled_reverse_kl,
    student_buckets,
    teacher_buckets,
    temper,
)
from rgsd_pipeline.policy_gradient import clipped_policy_gradient


@dataclass(frozen=True)
class LossSpec:
    kind: str = "jsd"  # "jsd" (generalized JSD; beta 0 = forward KL, 1 = reverse KL) or "sampled_reverse_kl"
    beta: float = 0.5
    clip: str = "entry"  # "entry", "soft", "token" or "none" (see losses.py)
    tau: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0  # weight of cross-entropy on the sampled tokens, mixed in
    importance_cap: float = 2.0  # sampled_reverse_kl: truncation of the importance weight (0: no correction)
    ratio_clip: float = 0.2  # grpo: the ratio is clipped to [1 - ratio_clip, 1 + ratio_clip]
    kl_coef: float = 0.0  # grpo: weight of the k3 estimate of KL(policy || base)

    @classmethod
    def of(cls, train_config: TrainConfig) -> LossSpec:
        """The loss settings of a config's `train` section."""
        t = train_config
        return cls(kind=t.loss, beta=t.beta, clip=t.clip, tau=t.tau, temperature=t.distill_temperature,
                   ce_weight=t.ce_weight, importance_cap=t.importance_cap, ratio_clip=t.grpo_clip,
                   kl_coef=t.kl_coef)

    @property
    def needs_rewards(self) -> bool:
        """A policy-gradient loss trains on judge rewards (iter-I/rewards/), not on teacher signals."""
        return self.kind == "grpo"


@dataclass
class Targets:
    """What the loss needs at the N trained positions of a batch (flattened)."""

    topk_ids_N_K: torch.Tensor  # int64
    teacher_topk_N_K: torch.Tensor  # fp32 teacher log-probs, as decoded from storage
    teacher_tail_N: torch.Tensor  # fp32 teacher log-mass outside its top-k, exact (measured at score time)
    teacher_token_N: torch.Tensor  # fp32 teacher log-prob of the sampled token
    behaviour_token_N: torch.Tensor | None  # fp32 log-prob of the sampled token under the distribution it was drawn
    # from (sampled_reverse_kl's importance weight; None when the rollouts did not record it)
    token_ids_N: torch.Tensor  # int64 sampled token at each position
    weight_N: torch.Tensor  # fp32 reduction weights (see losses.position_weights)
    old_token_N: torch.Tensor | None = None  # fp32 grpo: the sampled token's log-prob under the sampling policy
    advantage_N: torch.Tensor | None = None  # fp32 grpo: the rollout's group advantage at each of its tokens
    reference_token_N: torch.Tensor | None = None  # fp32 grpo with kl_coef: the base model's log-prob of the token


# Per-chunk sums that distill_loss returns, in this order (metrics divide them by the loss tokens). Under grpo the
# slots hold the k3 KL to the base, the tokens whose ratio was clipped and the ratio (the trainer names them
# kl_to_base, ratio_clip_fraction, ratio_mean), and the tails are 0.
STAT_NAMES = ("divergence", "clipped", "teacher_tail", "student_tail", "importance_weight")


def _chunk_loss(hidden_C_H, head_weight_V_H, head_bias, topk_ids_C_K, teacher_topk_C_K, teacher_tail_C,
                teacher_token_C, behaviour_token_C, token_ids_C, weight_C, old_token_C, advantage_C, reference_C,
                spec: LossSpec):
    # The LM head in fp32 even under bf16 autocast: bf16 logits are rounded to 1/16 of a nat at logit 10, which moved
    # top-20 log-probs by 0.03 nats on average, the size of tau (docs/architecture.md, "Precision").
    with torch.autocast(hidden_C_H.device.type, enabled=False):
        logits_C_V = torch.nn.functional.linear(hidden_C_H.float(), head_weight_V_H.float(),
                                                None if head_bias is None else head_bias.float())
    student_C_V = logits_C_V.log_softmax(-1)
    student_token_C = student_C_V.gather(-1, token_ids_C[:, None])[:, 0]
    if spec.kind == "grpo":
        loss_C, ratio_C, clipped_C, kl_C = clipped_policy_gradient(student_token_C, old_token_C, advantage_C,
                                                                   spec.ratio_clip, reference_C, spec.kl_coef)
        zero = loss_C.new_zeros(())
        stats = {"divergence": kl_C.sum(), "clipped": clipped_C.float().sum(), "teacher_tail": zero,
                 "student_tail": zero, "importance_weight": ratio_C.sum()}
        return (loss_C * weight_C).sum(), torch.stack([stats[name] for name in STAT_NAMES]), student_token_C.detach()
    student_C_K1 = student_buckets(student_C_V, topk_ids_C_K)
    teacher_C_K1 = teacher_buckets(teacher_topk_C_K, teacher_tail_C)
    importance_C = torch.ones_like(student_token_C)
    if spec.kind == "sampled_reverse_kl":
        importance_C = importance_weights(student_token_C, behaviour_token_C, spec.importance_cap)
        loss_C = importance_C * sampled_reverse_kl(student_token_C, teacher_token_C)
        _, divergence_C, clipped_C = distill_per_token(student_C_K1, teacher_C_K1, 1.0)
    else:
        loss_C, divergence_C, clipped_C = distill_per_token(temper(student_C_K1, spec.temperature),
                                                            temper(teacher_C_K1, spec.temperature),
                                                            spec.beta, spec.clip, spec.tau)
    if spec.ce_weight:
        loss_C = loss_C - spec.ce_weight * student_token_C
    stats = {"divergence": divergence_C.sum(), "clipped": clipped_C.float().sum(),
             "teacher_tail": teacher_C_K1[:, -1].exp().sum(), "student_tail": student_C_K1[:, -1].detach().exp().sum(),
             "importance_weight": importance_C.sum()}
    return (loss_C * weight_C).sum(), torch.stack([stats[name] for name in STAT_NAMES]), student_token_C.detach()


def _call(function, *args, use_reentrant=False):
    """`function(*args)`, called like torch.utils.checkpoint.checkpoint but keeping its activations."""
    return function(*args)


def distill_loss(hidden_N_H: torch.Tensor, lm_head: torch.nn.Linear, targets: Targets, spec: LossSpec,
                 chunk_positions: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, per-stat sums in STAT_NAMES order, the student's fp32 log-prob of each sampled token [N],
    detached) over N positions."""
    loss = hidden_N_H.new_zeros((), dtype=torch.float32)
    stats = torch.zeros(len(STAT_NAMES), device=hidden_N_H.device)
    student_token_parts = []
    positions = hidden_N_H.shape[0]
    # The last chunk's backward runs first, while no other chunk's logits are in memory: keeping its activations
    # costs no more than recomputing them would, so only the chunks before it are recomputed, and the short chunk
    # (the remainder) comes first.
    for hi in reversed(range(positions, 0, -chunk_positions)):
        part = slice(max(hi - chunk_positions, 0), hi)
        cut = lambda t, part=part: None if t is None else t[part]  # noqa: E731
        recompute = hi < positions
        chunk_loss, chunk_stats, chunk_tokens = (checkpoint if recompute else _call)(
            _chunk_loss, hidden_N_H[part], lm_head.weight, lm_head.bias, targets.topk_ids_N_K[part],
            targets.teacher_topk_N_K[part], targets.teacher_tail_N[part], targets.teacher_token_N[part],
            cut(targets.behaviour_token_N), targets.token_ids_N[part], targets.weight_N[part],
            cut(targets.old_token_N), cut(targets.advantage_N), cut(targets.reference_token_N), spec,
            use_reentrant=False)
        loss = loss + chunk_loss
        stats += chunk_stats.detach()
        student_token_parts.append(chunk_tokens)
    return loss, stats, torch.cat(student_token_parts) if student_token_parts else hidden_N_H.new_zeros(0)
