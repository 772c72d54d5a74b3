"""The engine interface and the records it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0

    @classmethod
    def of(cls, rollout_config) -> Sampling:
        """The sampling settings of a config's `rollout` section."""
        r = rollout_config
        return cls(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                   repetition_penalty=r.repetition_penalty)


@dataclass
class Generation:
    token_ids: list[int]  # the sampled response, EOS included when it stopped on one
    logprobs: list[float]  # log-prob of each sampled token under the raw model (temperature 1)
    finish_reason: str  # "stop" or "length"


@dataclass
class Scores:
    """Teacher log-probs over the T response positions of one sequence."""

    topk_ids_T_K: np.ndarray  # int64 [T, k], best first
    topk_logprobs_T_K: np.ndarray  # float32 [T, k]
    token_logprob_T: np.ndarray  # float32 [T], log-prob of the token actually at each position


class Engine(Protocol):
    kind: str

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
                 on_progress=None) -> list[Generation]: ...

    def score(self, sequences: list[list[int]], prompt_lens: list[int], k: int, on_progress=None) -> list[Scores]: ...

    def close(self) -> None: ...
