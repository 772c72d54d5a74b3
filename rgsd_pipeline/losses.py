"""Token-level distillation losses over the teacher's top-k plus one tail bucket.

Shapes (letters as in rgsd_pipeline/__init__.py): N response positions (any batch flattened), K stored
teacher entries per position, K1 = K + 1 buckets, V the vocabulary. Every function works in fp32 (or
fp64) log space.

Both distributions are reduced to K + 1 buckets: the teacher's top-k tokens, and the tail (all other
tokens). The teacher's tail mass is measured exactly at score time and stored; its decoded top-k is
rescaled so that top-k + tail = 1. The student's tail is 1 - its mass on the teacher's top-k. With
K = V the tail is empty and every loss equals its full-vocabulary value.

Divergences (β follows the generalized JSD of on-policy distillation papers and TRL's GKD):

    β = 0      forward KL  KL(teacher || student)
    β = 1      reverse KL  KL(student || teacher)
    0 < β < 1  JSD_β = β KL(teacher || M) + (1 - β) KL(student || M),  M = β teacher + (1 - β) student
               (β = 0.5 is the symmetric Jensen–Shannon divergence, the RGSD paper's choice)

Clipping at τ (the paper reports τ = 0.05 without saying where it applies). D is a position's
divergence, d_i the pointwise term of bucket i (D = Σ d_i):

    entry  Σ_{i<K} min(d_i, τ) + d_tail   (default) an entry whose term exceeds τ gives no gradient, the
                                          others and the tail still do. OPSD's reading, and TRL's OPSD
                                          trainer (distillation_kl_clip); the tail is exempt because one
                                          bucket stands for thousands of vocabulary entries.
    soft   D · min(1, τ / D)  (the factor detached): the value is capped at τ, and a position above τ
                                          keeps a gradient scaled by τ / D: its pull is bounded, not dropped.
    token  min(D, τ)                      a position above τ gives no gradient at all: the positions the
                                          rubric changes most are the ones this drops.
    none   D

Temperature T is one operation on both sides: each bucket distribution is raised to 1/T and renormalised
(log p / T − logsumexp), so student = teacher gives zero loss and zero gradient for any T.
"""

from __future__ import annotations

import math

import torch

from rgsd_pipeline.choices import ClipMode, names

CLIP_MODES = names(ClipMode)
TAIL_FLOOR = 1e-13  # the least tail mass a bucket keeps, so a KL term (or its gradient) is never infinite


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x; -inf at x = 0."""
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2)
    # Each branch gets inputs where it is finite, so the unused branch cannot put NaN into the gradient.
    small = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    large = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, small, large)


def with_tail(topk_logprobs_N_K: torch.Tensor) -> torch.Tensor:
    """[N, K1] log-probs: the top-k entries plus the log of the remaining mass (at least TAIL_FLOOR).

    Rounding (or K close to V) can make the top-k mass reach 1; an empty bucket would make a KL term, or
    its gradient, infinite.
    """
    topk_mass_N_1 = torch.logsumexp(topk_logprobs_N_K, dim=-1, keepdim=True).clamp(max=-TAIL_FLOOR)
    return torch.cat([topk_logprobs_N_K, log1mexp(topk_mass_N_1)], dim=-1)


def teacher_buckets(topk_logprobs_N_K: torch.Tensor, tail_logprob_N: torch.Tensor) -> torch.Tensor:
    """[N, K1] teacher log-probs: the top-k rescaled so that top-k + the stored tail mass = 1, then the tail.

    Stored top-k values may be rounded (uint8 codes put their sum above 1 at peaked positions); the tail,
    measured in fp32 at score time, is the exact quantity, so the top-k take whatever mass it leaves.
    """
    tail_N_1 = tail_logprob_N[:, None].clamp(min=math.log(TAIL_FLOOR), max=math.log1p(-TAIL_FLOOR))
    topk_N_K = topk_logprobs_N_K - torch.logsumexp(topk_logprobs_N_K, dim=-1, keepdim=True) + log1mexp(tail_N_1)
    return torch.cat([topk_N_K, tail_N_1], dim=-1)


def student_buckets(student_logprobs_N_V: torch.Tensor, topk_ids_N_K: torch.Tensor) -> torch.Tensor:
    """[N, K1] student log-probs on the teacher's top-k ids plus the student's remaining mass."""
    return with_tail(student_logprobs_N_V.gather(-1, topk_ids_N_K))


def temper(logprobs_N_K1: torch.Tensor, temperature: float) -> torch.Tensor:
    """Renormalised log p / T over the buckets: the same operation for teacher and student."""
    if temperature == 1.0:
        return logprobs_N_K1
    scaled_N_K1 = logprobs_N_K1 / temperature
    return scaled_N_K1 - torch.logsumexp(scaled_N_K1, dim=-1, keepdim=True)


def _kl_terms(p_log_N_K1: torch.Tensor, q_log_N_K1: torch.Tensor) -> torch.Tensor:
    """Pointwise p (log p - log q), 0 where p = 0 (also when q = 0 there)."""
    p_N_K1 = p_log_N_K1.exp()
    diff_N_K1 = torch.where(p_N_K1 > 0, p_log_N_K1 - q_log_N_K1, torch.zeros_like(p_log_N_K1))
    return p_N_K1 * diff_N_K1


def divergence_terms(teacher_log_N_K1: torch.Tensor, student_log_N_K1: torch.Tensor, beta: float) -> torch.Tensor:
    """[N, K1] pointwise terms whose sum over the buckets is the generalized JSD(β) per position."""
    if beta == 0.0:
        return _kl_terms(teacher_log_N_K1, student_log_N_K1)
    if beta == 1.0:
        return _kl_terms(student_log_N_K1, teacher_log_N_K1)
    mixture_N_K1 = torch.logsumexp(torch.stack([teacher_log_N_K1 + math.log(beta),
                                                student_log_N_K1 + math.log(1 - beta)]), dim=0)
    return (beta * _kl_terms(teacher_log_N_K1, mixture_N_K1)
            + (1 - beta) * _kl_terms(student_log_N_K1, mixture_N_K1))


def distill_per_token(student_log_N_K1: torch.Tensor, teacher_log_N_K1: torch.Tensor, beta: float,
                      clip: str = "none", tau: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_N, divergence_N, clipped_N): the per-position loss, the unclipped divergence, and where τ bit.

    The last bucket is the tail (see the module docstring for the clip modes)."""
    terms_N_K1 = divergence_terms(teacher_log_N_K1, student_log_N_K1, beta)
    divergence_N = terms_N_K1.sum(-1)
    over_N = divergence_N.detach() > tau
    if clip == "entry":
        topk_N_K = terms_N_K1[:, :-1]
        loss_N = topk_N_K.clamp(max=tau).sum(-1) + terms_N_K1[:, -1]
        return loss_N, divergence_N.detach(), (topk_N_K.detach() > tau).any(-1)
    if clip == "soft":
        scale_N = (tau / divergence_N.detach().clamp(min=tau)) if tau > 0 else torch.zeros_like(divergence_N)
        return divergence_N * scale_N, divergence_N.detach(), over_N
    if clip == "token":
        return divergence_N.clamp(max=tau), divergence_N.detach(), over_N
    if clip != "none":
        raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}; got {clip!r}")
    return divergence_N, divergence_N.detach(), torch.zeros_like(over_N)


def importance_weights(student_token_N: torch.Tensor, behaviour_token_N: torch.Tensor, cap: float) -> torch.Tensor:
    """[N] truncated importance weights min(cap, π_θ(y) / π_behaviour(y)), detached; ones when cap = 0.

    π_behaviour is the distribution the rollout engine actually sampled from (temperature, top-k, top-p
    and repetition penalty applied), so the weight corrects both for rollouts that are some updates old
    and for sampling that was not the model's own distribution.
    """
    if cap == 0:
        return torch.ones_like(student_token_N)
    return (student_token_N.detach() - behaviour_token_N).exp().clamp(max=cap)


def sampled_reverse_kl(student_token_logprob_N: torch.Tensor, teacher_token_logprob_N: torch.Tensor) -> torch.Tensor:
    """[N] per-token loss of on-policy distillation's sampled-token reverse-KL estimator.

    The advantage of the sampled token is -(log q - log p); its policy-gradient loss is
    (log q - log p).detach() * log q, whose gradient in expectation over the student's samples is the
    gradient of KL(student || teacher). Multiply by `importance_weights` when the samples came from
    another distribution than the current student's.
    """
    return (student_token_logprob_N - teacher_token_logprob_N).detach() * student_token_logprob_N


def position_weights(sequence_N: torch.Tensor, mode: str, num_tokens: int, num_sequences: int,
                     max_response_tokens: int = 0) -> torch.Tensor:
    """[N] weights w such that sum(w * loss_N) is the reduced loss.

    token mean:    w = 1 / num_tokens                                 (DAPO's token-level mean)
    sequence mean: w = 1 / (tokens of that sequence * num_sequences)  (GRPO's: a short answer's tokens weigh more)
    constant:      w = 1 / (num_sequences * max_response_tokens)      (Dr. GRPO: the same for every token, whatever
                                                                       the lengths in the batch)
    `sequence_N` is each position's sequence index; the denominators may count a whole accumulated or
    distributed batch, so that micro-batches and ranks add up to the loss of the global batch.
    """
    if mode == "token":
        return torch.full(sequence_N.shape, 1.0 / max(num_tokens, 1))
    if mode == "sequence":
        count_S = torch.bincount(sequence_N)
        return 1.0 / (count_S[sequence_N].float() * max(num_sequences, 1))
    if mode == "constant":
        if max_response_tokens < 1:
            raise ValueError("reduction constant needs the longest response (rollout.max_new_tokens)")
        return torch.full(sequence_N.shape, 1.0 / (max(num_sequences, 1) * max_response_tokens))
    raise ValueError(f"reduction must be token, sequence or constant; got {mode!r}")
