"""The judge-based baseline the paper compares RGSD with: GRPO's group advantages and clipped policy gradient.

The rollouts of one prompt form a group (rollout.samples_per_prompt of them). A rollout's advantage is its
reward standardised within the group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)          (std with Bessel's correction, as GRPO)

so a group of one, or a group whose rewards are all equal, teaches nothing (A = 0); a rollout without a
reward (the judge could grade none of its criteria, or the prompt was skipped) has no advantage and is
left out of its group. Every token of a rollout carries its rollout's advantage. Per token, with the ratio
rho = pi_theta(y_t) / pi_old(y_t) of the policy being trained to the policy that sampled (both the model's
own distribution at temperature 1: rollouts store exactly that as `response_logprobs`):

    loss_t = -min(rho * A, clip(rho, 1 - eps_clip, 1 + eps_clip) * A)  +  kl_coef * k3_t
    k3_t   = exp(r_t) - r_t - 1,   r_t = log pi_ref(y_t) - log pi_theta(y_t)     (an unbiased, >= 0 KL estimate)

with pi_ref the base model (the optional KL to the base). Shapes as in rgsd_pipeline/__init__.py.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def group_advantages(prompt_ids: list[str], rewards: list[float | None], eps: float = 1e-6) -> list[float | None]:
    """A_i per rollout (None where the reward is None): the reward standardised within its prompt's group."""
    groups: dict[str, list[float]] = defaultdict(list)
    for prompt_id, reward in zip(prompt_ids, rewards, strict=True):
        if reward is not None:
            groups[prompt_id].append(reward)
    stats = {}
    for prompt_id, values in groups.items():
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        stats[prompt_id] = (mean, std)
    advantages = []
    for prompt_id, reward in zip(prompt_ids, rewards, strict=True):
        if reward is None:
            advantages.append(None)
            continue
        mean, std = stats[prompt_id]
        advantages.append(0.0 if std == 0.0 else (reward - mean) / (std + eps))
    return advantages


def clipped_policy_gradient(logprob_N: torch.Tensor, old_logprob_N: torch.Tensor, advantage_N: torch.Tensor,
                            clip: float, reference_logprob_N: torch.Tensor | None = None,
                            kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_N, ratio_N, clipped_N, kl_N) per token: the clipped surrogate plus kl_coef times the k3 estimate of
    KL(pi_theta || pi_ref) (0 without a reference)."""
    ratio_N = (logprob_N - old_logprob_N).exp()
    unclipped_N = ratio_N * advantage_N
    clipped_ratio_N = ratio_N.clamp(1.0 - clip, 1.0 + clip)
    surrogate_N = torch.minimum(unclipped_N, clipped_ratio_N * advantage_N)
    clipped_N = (clipped_ratio_N * advantage_N < unclipped_N).detach()
    if reference_logprob_N is None or kl_coef == 0.0:
        kl_N = torch.zeros_like(logprob_N)
    else:
        log_ratio_N = reference_logprob_N - logprob_N
        kl_N = log_ratio_N.exp() - log_ratio_N - 1.0
    return -surrogate_N + kl_coef * kl_N, ratio_N.detach(), clipped_N, kl_N.detach()
