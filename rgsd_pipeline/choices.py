"""Every list of names a user picks from that a module implements, spelled once.

The config's field types, the command-line choices and the implementing modules all read these, so a
new data format, engine kind or clip mode is its name here plus its branch in the module that implements
it (docs/architecture.md, "Where to change what"). No imports: config.py and `--help` stay light.
"""

from __future__ import annotations

from typing import Literal, get_args

RowFormat = Literal["rubrichub", "rar", "healthbench", "generic"]  # rows.normalize
EngineKind = Literal["vllm", "hf"]  # engines.make_engine
TeacherKind = Literal[EngineKind, "server"]  # engines.make_engine; server: engines/server_engine.py, scores only
ClipMode = Literal["entry", "soft", "token", "none"]  # losses.distill_per_token
LossKind = Literal["jsd", "sampled_reverse_kl", "grpo"]  # distill._chunk_loss; grpo: policy_gradient.py
RewardJudge = Literal["rules", "llm"]  # grading.make_grader
TrackerKind = Literal["none", "tensorboard", "wandb", "mlflow"]  # tracking.KINDS


def names(literal) -> tuple[str, ...]:
    """The names a Literal allows, in order."""
    return get_args(literal)
