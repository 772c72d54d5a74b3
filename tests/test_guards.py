"""The guards of every iteration: rollouts sampled from other weights than the trainer's are refused before any
update, and each phase's memory is measured beside the plan's estimate."""

import json
from pathlib import Path

import pytest
from helpers import cli

from rgsd_pipeline.distributed import World
from rgsd_pipeline.rollout_check import RolloutDriftError

SMALL = ["engine.kind=hf", "data.max_prompts=16", "rollout.prompts_per_iteration=8", "train.batch_size=8"]


@pytest.fixture
def prepared(tmp_path):
    run = tmp_path / "run"
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run, *SMALL)
    return run


@pytest.mark.slow
def test_an_engine_that_skips_a_weight_load_is_caught_at_iteration_1_before_it_trains(prepared, monkeypatch):
    """The engine keeps sampling from the base model after iteration 0 trained it (TRL's stale-weight bug, trl#5312):
    iteration 1 stops at its first step, naming the iteration, the engine and the gap; nothing of it is trained."""
    from rgsd_pipeline.engines.hf_engine import HfEngine
    from rgsd_pipeline.resident import run_iterations

    def skip_the_load(self, model_path, weights=None):
        self.model_path = Path(model_path)

    monkeypatch.setattr(HfEngine, "load_weights", skip_the_load)
    with pytest.raises(RolloutDriftError, match=r"iteration 1: .* the hf engine recorded by [\d.e-]+ nats per token "
                                                r"on average .*above train.max_rollout_logprob_gap=0.001"):
        run_iterations(prepared, 2, "hf", World())
    first = json.loads((prepared / "iter-000" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout_logprob_gap_mean"] < 1e-5 and first["rollout_logprob_gap_max"] < 1e-5  # the honest one
    assert not (prepared / "iter-001" / "checkpoint" / "_SUCCESS").exists()
    assert not (prepared / "iter-001" / "metrics.jsonl").exists()


def test_the_default_limit_follows_the_precision_of_engines_and_trainer():
    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.rollout_check import gap_limit

    assert gap_limit(load_config("configs/tiny.yaml")) == 1e-3
    assert gap_limit(load_config("configs/tiny.yaml", ["train.bf16=true"])) == 0.1
    assert gap_limit(load_config("configs/qwen2.5-7b-medical.yaml")) == 0.1
    assert gap_limit(load_config("configs/tiny.yaml", ["train.max_rollout_logprob_gap=0.02"])) == 0.02
