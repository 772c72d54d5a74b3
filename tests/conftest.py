"""Shared fixtures: no network, a private model cache, the tiny built-in model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
