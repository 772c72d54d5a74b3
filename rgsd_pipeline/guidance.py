"""Rubric guidance: a teacher the rubric moves further than reading it does (score.guidance, default 0: the paper).

The stored teacher distribution at each response position becomes

    log p_guided = log_softmax((1 + g) * z_rubric - g * z_negative)

with z_rubric the frozen base model's logits reading prompt + rubric (the paper's teacher) and z_negative its
logits reading the negative (`score.guidance_negative`): `plain`, what the student reads (classifier-free guidance
for language models, arXiv 2306.17806; context-aware decoding, arXiv 2305.14739, with a = g); or `other_rubric`,
the question with another training prompt's rubric, which cancels the style shift any rubric causes (reciting
instructions, list formatting) and keeps what this prompt's criteria change. Both passes are the frozen base, so
the target does not drift while the student trains; g = 0 is the rubric pass alone, computed as today.

How the guided distribution's top-k and exact tail are obtained depends on what an engine returns:

- the transformers engine has full-vocabulary logits: both passes' fp32 log-softmax at every position, combined
  exactly (`guided_logprobs`), then top-k and the tail summed over the rest, as for an unguided teacher;
- vLLM and the teacher service return the top-K' of each pass (`score.guidance_candidates`; 0 asks vLLM for the
  whole vocabulary, exact and slow). `from_candidates` builds the guided distribution over the rubric pass's top-K'
  (a token's negative log-prob, when outside the negative pass's list, taken as that list's last value: the most it
  can be) plus one bucket for the rest, whose guided mass is (P_rest)^(1+g) (Q_rest)^(-g): by the data-processing
  inequality of the Renyi divergence of order 1 + g, the least the tokens in it can hold. There is no two-sided
  bound: a token the negative pass finds very unlikely gets an unbounded boost, which is classifier-free guidance's
  own behaviour, not the approximation's. The sampled token's guided log-prob uses both passes' exact values (each
  pass returns the actual token). Its error against the exact computation is measured in bench/score.py.

Shapes as in rgsd_pipeline/__init__.py (T response positions of one sequence, K stored, V vocabulary).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from rgsd_pipeline.choices import GuidanceNegative, names
from rgsd_pipeline.render import student_messages, teacher_messages
from rgsd_pipeline.rows import split_draw

NEGATIVES = names(GuidanceNegative)


@dataclass(frozen=True)
class Contrast:
    """The negative pass of a guided request: one token sequence per positive one, and the scale g."""

    sequences: list[list[int]]
    prompt_lens: list[int]  # for scoring: where each negative sequence's response starts
    scale: float


def guided_logprobs(rubric_C_V, negative_C_V, scale: float):
    """[C, V] log-softmax((1 + g) rubric - g negative) of two passes' log-probs (or logits: a per-row constant cancels),
    in the inputs' precision (torch tensors)."""
    return ((1.0 + scale) * rubric_C_V - scale * negative_C_V).log_softmax(-1)


def from_candidates(rubric, negative, token_ids_T: np.ndarray, k: int, scale: float, vocabulary: int):
    """The guided top-k, the sampled token's guided log-prob and the guided tail, from two passes that return only
    their top-K' (engines.base.Scores of k = K', best first, each with the actual token's exact log-prob) over a
    `vocabulary` of V tokens (K' = V: exact): see the module docstring. Returns Scores of k entries, the two
    passes' log-probs of the sampled token attached."""
    from rgsd_pipeline.engines.base import Scores

    g = float(scale)
    rubric_ids_T_K = rubric.topk_ids_T_K
    rubric_T_K = rubric.topk_logprobs_T_K.astype(np.float64)
    negative_T_K = negative.topk_logprobs_T_K.astype(np.float64)
    positions, width = rubric_ids_T_K.shape
    # The negative pass's log-prob of each rubric candidate: its own value where it listed it, else its last value.
    negative_of_T_K = np.repeat(negative_T_K[:, -1:], width, axis=1)
    for t in range(positions):
        where = {int(i): j for j, i in enumerate(negative.topk_ids_T_K[t])}
        for j, token in enumerate(rubric_ids_T_K[t]):
            if int(token) in where:
                negative_of_T_K[t, j] = negative_T_K[t, where[int(token)]]
            if int(token) == int(token_ids_T[t]):  # the sampled token: both passes give its exact value
                negative_of_T_K[t, j] = negative.token_logprob_T[t]
    logits_T_K = (1.0 + g) * rubric_T_K - g * negative_of_T_K
    if width >= vocabulary:  # both passes listed every token: nothing is left for the bucket
        rest_logit_T = np.full(positions, -np.inf)
    else:
        # A list's missing mass below the rounding of its K' float32 values is noise, not mass: the rubric pass's
        # bucket is then empty, and the negative pass's is taken at that noise level (guidance would divide by it).
        noise = math.log(4 * width * np.finfo(np.float32).eps)
        rest_rubric_T = _log1m(np.logaddexp.reduce(rubric_T_K, axis=-1))
        rest_negative_T = np.maximum(_log1m(np.logaddexp.reduce(negative_of_T_K, axis=-1)), noise)
        rest_logit_T = np.where(rest_rubric_T > noise, (1.0 + g) * rest_rubric_T - g * rest_negative_T, -np.inf)
    log_z_T = np.logaddexp(np.logaddexp.reduce(logits_T_K, axis=-1), rest_logit_T)
    guided_T_K = logits_T_K - log_z_T[:, None]
    order_T_K = np.argsort(-guided_T_K, axis=-1, kind="stable")[:, :k]
    top_T_K = np.take_along_axis(guided_T_K, order_T_K, axis=-1)
    token_T = (1.0 + g) * rubric.token_logprob_T.astype(np.float64) - g * negative.token_logprob_T.astype(
        np.float64) - log_z_T
    tail_T = _log1m(np.logaddexp.reduce(top_T_K, axis=-1))
    return Scores(np.take_along_axis(rubric_ids_T_K, order_T_K, axis=-1).astype(np.int64), top_T_K.astype(np.float32),
                  np.minimum(token_T, 0.0).astype(np.float32), tail_T.astype(np.float32),
                  rubric.token_logprob_T.astype(np.float32), negative.token_logprob_T.astype(np.float32))


def _log1m(log_mass_T: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) in float64, -inf where the mass reaches 1."""
    mass_T = np.exp(np.minimum(log_mass_T, 0.0))
    return np.log(np.clip(1.0 - mass_T, 0.0, None), where=mass_T < 1.0, out=np.full(mass_T.shape, -np.inf))


def other_rubrics(prompts: list[dict], seed: int, pool: list[dict] | None = None) -> dict[str, dict]:
    """For every prompt, the training prompt whose rubric its `other_rubric` negative reads: the next one in a seeded
    order of the training prompts (`pool`, by default those among `prompts`) whose criteria differ from its own (any
    other one when none differs, as in builtin:howto, whose prompts all carry the same three criteria: there the
    negative equals the rubric pass and guidance changes nothing). Held-out rubrics are never read."""
    pool = [p for p in prompts if p["split"] == "train"] if pool is None else pool
    train = sorted(pool, key=lambda p: split_draw(p["prompt_id"], seed))
    if not train:
        return {}
    draws = [split_draw(p["prompt_id"], seed) for p in train]
    criteria = lambda p: [c["criterion"] for c in p["rubric"]]  # noqa: E731
    chosen = {}
    for prompt in prompts:
        start = bisect.bisect_right(draws, split_draw(prompt["prompt_id"], seed))
        ring = [train[(start + i) % len(train)] for i in range(len(train))]
        others = [p for p in ring if p["prompt_id"] != prompt["prompt_id"]] or ring
        chosen[prompt["prompt_id"]] = next((p for p in others if criteria(p) != criteria(prompt)), others[0])
    return chosen


def negative_messages(prompt: dict, template, negative: str, others: dict[str, dict]) -> list[dict]:
    """The conversation the negative pass reads for a prompt: the student's view (plain), or the question with
    another training prompt's rubric (other_rubric)."""
    if negative == "plain":
        return student_messages(prompt, template)
    if negative == "other_rubric":
        return teacher_messages({**prompt, "rubric": others[prompt["prompt_id"]]["rubric"]}, template)
    raise ValueError(f"score.guidance_negative must be one of {', '.join(NEGATIVES)}; got {negative!r}")
