"""The engine interface and the records it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    behaviour_logprobs: bool = False  # record the drawn distribution's log-probs even when they cost a pass

    @classmethod
    def of(cls, config: RunConfig) -> Sampling:
        """The sampling settings of a config's `rollout` section; the behaviour log-probs are recorded when asked for
        or when the loss reads them (sampled_reverse_kl's importance weight)."""
        r = config.rollout
        return cls(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                   repetition_penalty=r.repetition_penalty,
                   behaviour_logprobs=r.sampling_logprobs or config.train.reads_behaviour_logprobs)

    @property
    def is_model_distribution(self) -> bool:
        """True when tokens are drawn from the model's own distribution (nothing tempers or truncates it)."""
        return self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k == 0 and self.repetition_penalty == 1.0

    @property
    def records_behaviour(self) -> bool:
        """Whether a generation carries sampling_logprobs: asked for, or free (the model's own distribution)."""
        return self.behaviour_logprobs or self.is_model_distribution


@dataclass
class Generation:
    token_ids: list[int]  # the sampled response, EOS included when it stopped on one
    logprobs: list[float]  # log-prob of each sampled token under the raw model (temperature 1)
    sampling_logprobs: list[float] | None  # ... under the distribution it was drawn from (the behaviour policy);
    # None unless Sampling.records_behaviour
    finish_reason: str  # "stop" or "length"


@dataclass
class Scores:
    """Teacher log-probs over the T response positions of one sequence."""

    topk_ids_T_K: np.ndarray  # int64 [T, K], best first
    topk_logprobs_T_K: np.ndarray  # float32 [T, K]
    token_logprob_T: np.ndarray  # float32 [T], log-prob of the token actually at each position
    tail_logprob_T: np.ndarray  # float32 [T], log of the mass outside the top-k
    rubric_token_logprob_T: np.ndarray | None = None  # guided: float32 [T], the rubric pass alone, sampled token
    negative_token_logprob_T: np.ndarray | None = None  # guided: float32 [T], the negative pass, sampled token


class EngineError(UserError, RuntimeError):
    """An engine failed on one of the sequences it was given (`index`, when one is to blame)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class Engine:
    """What an engine may be asked for; every engine kind derives from this class and overrides what it does.

    Every kind passes the conformance checks of tests/test_engines.py against an independent forward pass."""

    kind: str = ""
    model_path: Path  # the folder whose weights the engine holds now
    in_process = False  # True when new weights can be handed over as tensors (load_weights' `weights`)
    weights_discarded = False  # sleep(discard_weights=True) freed the weights: load_weights before the next request
    notes: tuple[str, ...] = ()  # what the engine measured when it started, for the stage's output (the server probe)

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
                 on_progress=None, contrast=None) -> list[Generation]:
        """One sample per prompt, drawn with its own seed (a prompt's tokens must not depend on its batch). With
        `contrast` (guidance.Contrast: a negative prompt per prompt), from the guided distribution; only engines with
        full-vocabulary logits can (the transformers engine)."""
        raise NotImplementedError(f"the {self.kind} engine does not sample")

    def score(self, sequences: list[list[int]], prompt_lens: list[int], k: int, on_progress=None) -> list[Scores]:
        """The top-k log-probs, the actual token's and the tail's at every position after each prompt."""
        raise NotImplementedError(f"the {self.kind} engine does not score")

    def score_guided(self, sequences: list[list[int]], prompt_lens: list[int], contrast, k: int, candidates: int,
                     on_progress=None) -> list[Scores]:
        """As score(), for the rubric-guided distribution (rgsd_pipeline/guidance.py) of these sequences against
        `contrast` (guidance.Contrast: the negative pass's sequences, the same responses). This default scores both
        passes' top-`candidates` and builds the guided distribution from them (guidance.from_candidates), for engines
        that return top-k lists only; an engine with full-vocabulary logits computes it exactly instead."""
        from rgsd_pipeline.guidance import from_candidates

        width = -1 if candidates < 0 else max(candidates, k)  # -1: the whole vocabulary, where the engine can
        rubric = self.score(sequences, prompt_lens, width, on_progress)
        negative = self.score(contrast.sequences, contrast.prompt_lens, width)
        vocabulary = getattr(self, "vocab_size", 1 << 62)  # an engine that knows it can list the whole vocabulary
        return [from_candidates(r, n, np.asarray(s[p:], dtype=np.int64), k, contrast.scale, vocabulary)
                for r, n, s, p in zip(rubric, negative, sequences, prompt_lens, strict=True)]

    def logprobs_at(self, sequences: list[list[int]], prompt_lens: list[int], ids_T_K: list[np.ndarray]
                    ) -> list[np.ndarray]:
        """This model's log-probs of given ids [T, K] at every position after each prompt (held-out divergence)."""
        raise NotImplementedError(f"the {self.kind} engine does not give log-probs of chosen ids")

    def load_weights(self, model_path: Path, weights: dict | None = None) -> None:
        """Take another checkpoint of the same architecture in place (from memory when `weights` is given)."""
        raise NotImplementedError(f"the {self.kind} engine cannot take new weights in place")

    def sleep(self, discard_weights: bool = False) -> int:
        """Free what it holds on a shared device while others use it (a no-op unless the kind can); returns the
        bytes given back, as far as the kind can tell (0 otherwise). With `discard_weights`, the caller will load
        new weights before the next request, so the kind may free its weights too (weights_discarded says whether
        it did)."""
        return 0

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back what sleep() freed (all of it, or the memory of `tags` alone where the kind can)."""

    def close(self) -> None:
        """Release everything; the engine is not used again."""
