"""Token-level distillation losses over the teacher's top-k plus one tail bucket.

Shapes: N response positions (any batch flattened), K stored teacher entries per position, V the
vocabulary. Every function works in fp32 log space.

Both distributions are reduced to K + 1 buckets: the teacher's top-k tokens, and the tail (all other
tokens, mass 1 - sum of top-k). With K = V the tail is empty and every loss equals its full-vocabulary
value exactly.

Divergences (β follows the generalized JSD of on-policy distillation papers and TRL's GKD):

    β = 0      forward KL  KL(teacher || student)
    β = 1      reverse KL  KL(student || teacher)
    0 < β < 1  JSD_β = β KL(teacher || M) + (1 - β) KL(student || M),  M = β teacher + (1 - β) student
               (β = 0.5 is the symmetric Jensen–Shannon divergence, the RGSD paper's choice)

Clipping at τ (the paper reports τ = 0.05 without saying where it applies; both readings exist):
`clip="token"` caps each position's divergence at τ (positions above τ give no gradient);
`clip="entry"` caps each bucket's pointwise term at τ before summing over buckets.
"""

from __future__ import annotations

import math

import torch

NEG_INF = -float("inf")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x; -inf at x = 0."""
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2)
    # Each branch gets inputs where it is finite, so the unused branch cannot put NaN into the gradient.
    small = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    large = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, small, large)


TAIL_MAX_TOPK_LOGMASS = -1e-13  # top-k log-mass cap, so the tail keeps at least about 1e-13 of mass


def with_tail(topk_logprobs_N_K: torch.Tensor) -> torch.Tensor:
    """[N, K+1] log-probs: the top-k entries plus the log of the remaining mass.

    The tail keeps at least about 1e-13 of mass: rounding (fp16 storage, or K close to V) can make the
    top-k mass reach 1, and an empty bucket would make a KL term, or its gradient, infinite.
    """
    topk_mass_N_1 = torch.logsumexp(topk_logprobs_N_K, dim=-1, keepdim=True).clamp(max=TAIL_MAX_TOPK_LOGMASS)
    tail_N_1 = log1mexp(topk_mass_N_1)
    return torch.cat([topk_logprobs_N_K, tail_N_1], dim=-1)


def student_buckets(student_logprobs_N_V: torch.Tensor, topk_ids_N_K: torch.Tensor) -> torch.Tensor:
    """[N, K+1] student log-probs on the teacher's top-k ids plus the student's remaining mass."""
    return with_tail(student_logprobs_N_V.gather(-1, topk_ids_N_K))


def temper(logprobs_N_B: torch.Tensor, temperature: float) -> torch.Tensor:
    """Renormalised log p / T over the buckets (the tail is tempered as one bucket)."""
    if temperature == 1.0:
        return logprobs_N_B
    scaled_N_B = logprobs_N_B / temperature
    return scaled_N_B - torch.logsumexp(scaled_N_B, dim=-1, keepdim=True)


def _kl_terms(p_log_N_B: torch.Tensor, q_log_N_B: torch.Tensor) -> torch.Tensor:
    """Pointwise p (log p - log q), 0 where p = 0 (also when q = 0 there)."""
    p_N_B = p_log_N_B.exp()
    diff_N_B = torch.where(p_N_B > 0, p_log_N_B - q_log_N_B, torch.zeros_like(p_log_N_B))
    return p_N_B * diff_N_B


def divergence_terms(teacher_log_N_B: torch.Tensor, student_log_N_B: torch.Tensor, beta: float) -> torch.Tensor:
    """[N, B] pointwise terms whose sum over B is the generalized JSD(β) per position."""
    if beta == 0.0:
        return _kl_terms(teacher_log_N_B, student_log_N_B)
    if beta == 1.0:
        return _kl_terms(student_log_N_B, teacher_log_N_B)
    mixture_N_B = torch.logsumexp(torch.stack([teacher_log_N_B + math.log(beta),
                                               student_log_N_B + math.log(1 - beta)]), dim=0)
    return beta * _kl_terms(teacher_log_N_B, mixture_N_B) + (1 - beta) * _kl_terms(student_log_N_B, mixture_N_B)


def distill_per_token(student_log_N_B: torch.Tensor, teacher_log_N_B: torch.Tensor, beta: float,
                      clip: str = "none", tau: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_N, divergence_N, clipped_N): the per-position loss, the unclipped divergence, and where clipping bit."""
    terms_N_B = divergence_terms(teacher_log_N_B, student_log_N_B, beta)
    divergence_N = terms_N_B.sum(-1)
    if clip == "token":
        return divergence_N.clamp(max=tau), divergence_N.detach(), divergence_N.detach() > tau
    if clip == "entry":
        return terms_N_B.clamp(max=tau).sum(-1), divergence_N.detach(), (terms_N_B.detach() > tau).any(-1)
    if clip != "none":
        raise ValueError(f"clip must be none, token or entry; got {clip!r}")
    return divergence_N, divergence_N.detach(), torch.zeros_like(divergence_N, dtype=torch.bool)


def sampled_reverse_kl(student_token_logprob_N: torch.Tensor, teacher_token_logprob_N: torch.Tensor) -> torch.Tensor:
    """[N] per-token loss of on-policy distillation's sampled-token reverse-KL estimator.

    The advantage of the sampled token is -(log q - log p); its policy-gradient loss is
    (log q - log p).detach() * log q, whose gradient in expectation over the student's samples is the
    gradient of KL(student || teacher).
    """
    return (student_token_logprob_N - teacher_token_logprob_N).detach() * student_token_logprob_N


def position_weights(sequence_N: torch.Tensor, mode: str, num_tokens: int, num_sequences: int) -> torch.Tensor:
    """[N] weights w such that sum(w * loss_N) is the reduced loss.

    token mean:    w = 1 / num_tokens
    sequence mean: w = 1 / (tokens of that sequence * num_sequences)
    `sequence_N` is each position's sequence index; the denominators may count a whole accumulated or
    distributed batch, so that micro-batches and ranks add up to the loss of the global batch.
    """
    if mode == "token":
        return torch.full(sequence_N.shape, 1.0 / max(num_tokens, 1))
    if mode == "sequence":
        count_S = torch.bincount(sequence_N)
        return 1.0 / (count_S[sequence_N].float() * max(num_sequences, 1))
    raise ValueError(f"reduction must be token or sequence; got {mode!r}")
