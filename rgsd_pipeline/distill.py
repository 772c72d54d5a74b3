"""The student's distillation loss on a batch, with the LM head chunked over positions.

The student's [T, V] logits are never held for a whole sequence: positions are processed in chunks,
each chunk's LM head + log-softmax + loss runs under activation checkpointing, so only a chunk's
[C, V] exists at once and it is recomputed in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rgsd_pipeline.losses import distill_per_token, sampled_reverse_kl, student_buckets, temper, with_tail


@dataclass(frozen=True)
class LossSpec:
    kind: str = "jsd"  # "jsd" (generalized JSD; beta 0 = forward KL, 1 = reverse KL) or "sampled_reverse_kl"
    beta: float = 0.5
    clip: str = "token"  # "none", "token" or "entry"
    tau: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0  # weight of cross-entropy on the sampled tokens, mixed in


@dataclass
class Targets:
    """What the loss needs at the N trained positions of a batch (flattened)."""

    topk_ids_N_K: torch.Tensor  # int64
    teacher_topk_N_K: torch.Tensor  # fp32 teacher log-probs
    teacher_token_N: torch.Tensor  # fp32 teacher log-prob of the sampled token
    token_ids_N: torch.Tensor  # int64 sampled token at each position
    weight_N: torch.Tensor  # fp32 reduction weights (see losses.position_weights)


STAT_NAMES = ("divergence", "clipped", "teacher_tail", "student_tail")


def _chunk_loss(hidden_C_H, head_weight_V_H, head_bias, topk_ids_C_K, teacher_topk_C_K, teacher_token_C, token_ids_C,
                weight_C, spec: LossSpec):
    logits_C_V = torch.nn.functional.linear(hidden_C_H, head_weight_V_H, head_bias).float()
    if spec.temperature != 1.0:
        logits_C_V = logits_C_V / spec.temperature
    student_C_V = logits_C_V.log_softmax(-1)
    student_token_C = student_C_V.gather(-1, token_ids_C[:, None])[:, 0]
    student_C_B = student_buckets(student_C_V, topk_ids_C_K)
    teacher_C_B = temper(with_tail(teacher_topk_C_K), spec.temperature)
    if spec.kind == "sampled_reverse_kl":
        loss_C = sampled_reverse_kl(student_token_C, teacher_token_C)
        _, divergence_C, clipped_C = distill_per_token(student_C_B, teacher_C_B, 1.0)
    else:
        loss_C, divergence_C, clipped_C = distill_per_token(student_C_B, teacher_C_B, spec.beta, spec.clip, spec.tau)
    if spec.ce_weight:
        loss_C = loss_C - spec.ce_weight * student_token_C
    stats_4 = torch.stack([divergence_C.sum(), clipped_C.float().sum(), teacher_C_B[:, -1].exp().sum(),
                           student_C_B[:, -1].detach().exp().sum()])
    return (loss_C * weight_C).sum(), stats_4


def distill_loss(hidden_N_H: torch.Tensor, lm_head: torch.nn.Linear, targets: Targets, spec: LossSpec,
                 chunk_positions: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss, stats_4 sums of divergence / clipped / teacher tail / student tail) over N positions."""
    loss = hidden_N_H.new_zeros((), dtype=torch.float32)
    stats_4 = torch.zeros(4, device=hidden_N_H.device)
    for lo in range(0, hidden_N_H.shape[0], chunk_positions):
        part = slice(lo, lo + chunk_positions)
        chunk_loss, chunk_stats = checkpoint(
            _chunk_loss, hidden_N_H[part], lm_head.weight, lm_head.bias, targets.topk_ids_N_K[part],
            targets.teacher_topk_N_K[part], targets.teacher_token_N[part], targets.token_ids_N[part],
            targets.weight_N[part], spec, use_reentrant=False)
        loss = loss + chunk_loss
        stats_4 += chunk_stats.detach()
    return loss, stats_4
