"""Shared fixtures: no network, a private model cache, the tiny built-in model."""

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402
from helpers import ROOT, cli  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Built-in models are built once per test session into a private cache."""
    cache = os.environ.get("RGSD_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    os.environ["RGSD_CACHE_DIR"] = cache
    return cache


@pytest.fixture(scope="session")
def tiny_path(model_cache):
    from rgsd_pipeline.models import resolve_model

    return resolve_model("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from rgsd_pipeline.models import load_tokenizer

    return load_tokenizer(tiny_path)


def one_iteration(tmp_path_factory, name: str, **data) -> Path:
    """One RGSD iteration of the tiny model (HF engines, one optimizer step of 8) through the CLI; `data` overrides
    the data section."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["engine"]["kind"] = "hf"
    config["data"].update(rows_per_shard=8, **data)
    config["train"] = {"batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-3}
    path = tmp_path_factory.mktemp("config") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path_factory.mktemp(name) / "run"
    cli("iterate", "--config", path, "--run", run, "--iterations", 1)
    return run


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, model_cache):
    """One RGSD iteration of the tiny model on 16 training prompts (12 held out)."""
    return one_iteration(tmp_path_factory, "evaluated", max_prompts=16)


@pytest.fixture(scope="session")
def howto_run(tmp_path_factory, model_cache):
    """One RGSD iteration of the tiny model on builtin:howto, whose every criterion carries a predicate."""
    return one_iteration(tmp_path_factory, "howto", sources=["builtin:howto"], max_prompts=24, heldout_fraction=0.25)


# The paper's cadence at toy scale: 8 of the 16 training prompts per iteration, one optimizer step each, so two
# iterations are one epoch; the warmup spans both iterations (global steps 1 and 2).
SMALL = {"engine": {"kind": "hf"}, "data": {"max_prompts": 16, "rows_per_shard": 4},
         "rollout": {"prompts_per_iteration": 8},
         "train": {"batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 2, "save_every": 1}}


@pytest.fixture(scope="session")
def small_config(tmp_path_factory):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    for section, values in SMALL.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def two_iterations(small_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("iterate") / "run"
    out = cli("iterate", "--config", small_config, "--run", run, "--iterations", 2).stdout
    assert "2 iteration(s) complete" in out
    assert re.search(r"^iteration 1 took [\d.]+ s$", out, re.MULTILINE)  # what bench/trl_compare.py reads
    return run
