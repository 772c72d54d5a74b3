"""The judge-based baseline the paper compares RGSD with: GRPO's group advantages and clipped policy gradient.

The rollouts of one prompt form a group (rollout.samples_per_prompt of them). A rollout's advantage is its
reward standardised within the group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)          (std with Bessel's correction, as GRPO)

so a group of one, or a group whose rewards are all equal, teaches nothing (A = 0); a rollout without a
reward (the judge could grade none of its criteria, or the prompt was skipped) has no advantage and is
left out of its group. Every token of a rollout carries its rollout's advantage. Per token:

    loss_t = -w_t * min(rho_t * A, clip(rho_t, 1 - eps_clip, 1 + eps_clip) * A)  +  kl_coef * k3_t
    rho_t  = pi_theta(y_t) / pi_old(y_t)
    w_t    = min(importance_cap, pi_old(y_t) / mu(y_t))                          (1 when importance_cap = 0)
    k3_t   = exp(r_t) - r_t - 1,   r_t = log pi_ref(y_t) - log pi_theta(y_t)     (an unbiased, >= 0 KL estimate)

pi_theta is the model being trained, at temperature 1, computed by the trainer. pi_old is the same model at
the iteration's starting weights, computed by the trainer too, with the same precision and autocast: at the
first step it is pi_theta itself (detached), so rho = 1 exactly whatever dtype the engines sampled in; for later
steps of the iteration the trainer keeps it from before the first step. mu is the distribution the rollout
engine actually drew from (temperature, top-k, top-p and repetition penalty applied, in the engine's dtype:
`sampling_logprobs`), so w_t, a truncated importance weight (verl's TIS), corrects both for sampling that is not
the model's own distribution and for the engine's numerics. Tokens that truncated sampling (top-k, top-p) could
never draw get no correction: the gradient is the policy gradient restricted to what was sampleable. pi_ref is
the base model (the optional KL to the base), held in model.dtype and run under the policy's autocast, so k3 = 0
at identical weights. Shapes as in rgsd_pipeline/__init__.py.
"""

from __future__ import annotations

import math
from collections import defaultdict

from rgsd_pipeline.objectives import Objective


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


def clipped_policy_gradient(logprob_N, old_logprob_N, advantage_N, clip: float, reference_logprob_N=None,
                            kl_coef: float = 0.0, behaviour_weight_N=None) -> tuple:
    """(loss_N, ratio_N, clipped_N, kl_N) per token: the clipped surrogate, weighted by `behaviour_weight_N` (1 when
    None), plus kl_coef times the k3 estimate of KL(pi_theta || pi_ref) (0 without a reference)."""
    import torch

    ratio_N = (logprob_N - old_logprob_N).exp()
    unclipped_N = ratio_N * advantage_N
    clipped_ratio_N = ratio_N.clamp(1.0 - clip, 1.0 + clip)
    surrogate_N = torch.minimum(unclipped_N, clipped_ratio_N * advantage_N)
    if behaviour_weight_N is not None:
        surrogate_N = behaviour_weight_N * surrogate_N
    clipped_N = (clipped_ratio_N * advantage_N < unclipped_N).detach()
    if reference_logprob_N is None or kl_coef == 0.0:
        kl_N = torch.zeros_like(logprob_N)
    else:
        log_ratio_N = reference_logprob_N - logprob_N
        kl_N = log_ratio_N.exp() - log_ratio_N - 1.0
    return -surrogate_N + kl_coef * kl_N, ratio_N.detach(), clipped_N, kl_N.detach()


class GroupRelativePolicyGradient(Objective):
    """GRPO on the judge's rewards (iter-I/rewards/), every response token in the loss."""

    name = "grpo"
    reads_signals = False
    reads_rewards = True
    needs_old_logprobs = True
    min_samples_per_prompt = 2
    stats = ("kl", "ratio_clipped", "ratio", "behaviour_weight")

    def reads_behaviour(self, train) -> bool:
        return train.importance_cap > 0

    def needs_reference(self, train) -> bool:
        return train.kl_coef > 0

    def loss(self, student_C_V, student_token_C, targets, spec):
        from rgsd_pipeline.losses import importance_weights

        # pi_old: the trainer's own log-prob at the iteration's starting weights; at the first step that is the
        # current one (targets.old_token_N is None then).
        old_C = student_token_C.detach() if targets.old_token_N is None else targets.old_token_N
        weight_C = None
        if spec.importance_cap > 0 and targets.behaviour_token_N is not None:
            weight_C = importance_weights(old_C, targets.behaviour_token_N, spec.importance_cap)
        loss_C, ratio_C, clipped_C, kl_C = clipped_policy_gradient(
            student_token_C, old_C, targets.advantage_N, spec.ratio_clip, targets.reference_token_N, spec.kl_coef,
            weight_C)
        return loss_C, {"kl": kl_C, "ratio_clipped": clipped_C.float(), "ratio": ratio_C,
                        "behaviour_weight": ratio_C.new_ones(ratio_C.shape) if weight_C is None else weight_C}

    def metrics(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        per_token = {name: sums[name] / max(tokens, 1) for name in self.stats}
        return {"kl_to_base": per_token["kl"], "ratio_clip_fraction": per_token["ratio_clipped"],
                "ratio_mean": per_token["ratio"], "behaviour_weight": per_token["behaviour_weight"]}


GRPO = GroupRelativePolicyGradient()
