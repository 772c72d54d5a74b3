"""`train.loss=jsd+grpo`: RGSD's divergence plus a judge's reward on the same rollouts, as one composition.

    loss = JSD(teacher || student) over the teacher's top-k + tail   +   train.reward_weight * GRPO's clipped term

Every rollout is scored by the teacher (iter-I/signals/) and graded by the judge (iter-I/rewards/), so an
iteration runs rollout -> score -> reward -> train, and `rollout.samples_per_prompt` >= 2 gives GRPO its groups.
Both terms train the positions of the teacher's loss mask; a rollout the judge could not grade teaches through
the divergence alone. The metrics carry both objects' fields and each term's share (distill_loss, policy_loss).
verl's on-policy distillation offers the same with task rewards.
"""

from __future__ import annotations

from rgsd_pipeline.distillation import JSD
from rgsd_pipeline.objectives import Composite
from rgsd_pipeline.policy_gradient import GRPO

JSD_PLUS_GRPO = Composite("jsd+grpo", ((JSD, None, "distill_loss"), (GRPO, "reward_weight", "policy_loss")))
