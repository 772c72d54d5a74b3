"""Every list of names a user picks from that a module implements, spelled once.

The config's field types, the command-line choices and the implementing modules all read these, so a
new data format, engine kind, clip mode or loss is its name here plus its branch in the module that implements
it (docs/architecture.md, "Where to change what"). No imports: config.py and `--help` stay light.
"""

from __future__ import annotations

from typing import Literal, get_args

RowFormat = Literal["rubrichub", "rar", "healthbench", "generic"]  # rows.normalize
EngineKind = Literal["vllm", "hf"]  # engines.make_engine
TeacherKind = Literal[EngineKind, "server"]  # engines.make_engine; server: engines/server_engine.py, scores only
ClipMode = Literal["entry", "soft", "token", "none"]  # losses.distill_per_token
# Each training loss is one object ("module:name"): what it reads from the run, its forward and its metrics
# (rgsd_pipeline/objectives.py says what an object holds; docs/architecture.md, "Adding a loss").
LOSSES = {
    "jsd": "rgsd_pipeline.distillation:JSD",  # generalized JSD over the teacher's top-k + tail (the paper's)
    "sampled_reverse_kl": "rgsd_pipeline.distillation:SAMPLED_REVERSE_KL",  # on-policy distillation's estimator
    "grpo": "rgsd_pipeline.policy_gradient:GRPO",  # the judge-based baseline
    "jsd+grpo": "rgsd_pipeline.hybrid:JSD_PLUS_GRPO",  # both, on the same rollouts (train.reward_weight)
}
LossKind = Literal[tuple(LOSSES)]  # objectives.of
Reduction = Literal["token", "sequence", "constant"]  # losses.position_weights
GuidanceNegative = Literal["plain", "other_rubric"]  # guidance.negative_messages
RewardJudge = Literal["rules", "llm"]  # grading.make_grader
TrackerKind = Literal["none", "tensorboard", "wandb", "mlflow"]  # tracking.KINDS


def names(literal) -> tuple[str, ...]:
    """The names a Literal allows, in order."""
    return get_args(literal)
