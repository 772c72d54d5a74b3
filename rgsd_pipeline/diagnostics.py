"""Judge-free diagnostics: how far a policy is from the rubric-conditioned teacher, and what its answers look like.

- `divergence`: mean per-token JSD(β) between the teacher (prompt + rubric) and the policy over the
  policy's own responses, teacher top-k + one tail bucket (the quantity RGSD trains down);
- `repetition_rate`: share of repeated token 4-grams in a response;
- `rubric_leakage`: whether a response contains word 4-grams of its rubric's criteria that its prompt
  does not contain, or names the rubric itself ("rubric", "criteria", "criterion").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import polars as pl
import torch

from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.engines import Engine, Sampling
from rgsd_pipeline.fingerprints import fingerprint
from rgsd_pipeline.losses import divergence_terms, teacher_buckets, with_tail
from rgsd_pipeline.render import chat_ids, student_messages, teacher_messages
from rgsd_pipeline.shards import write_json_atomic

RUBRIC_WORDS = re.compile(r"\b(rubric|rubrics|criteria|criterion)\b", re.I)


@dataclass
class HeldoutReport:
    divergence: float  # mean per-token JSD(β) between teacher and policy over the policy's own samples
    tokens: int
    mean_length: float
    answers: list[str]  # the policy's responses, in prompt order


def divergence(policy: Engine, teacher: Engine, prompts: list[dict], responses: list[list[int]],
               config: RunConfig, top_k: int = 20, beta: float = 0.5) -> np.ndarray:
    """Per-token JSD(β) of teacher vs policy at every position of every response, concatenated."""
    tokenizer = policy.tokenizer
    student_ids = [chat_ids(tokenizer, student_messages(p, config.template)) for p in prompts]
    teacher_ids = [chat_ids(tokenizer, teacher_messages(p, config.template)) for p in prompts]
    scores = teacher.score([t + r for t, r in zip(teacher_ids, responses, strict=True)], [len(t) for t in teacher_ids],
                           top_k)
    student = policy.logprobs_at([s + r for s, r in zip(student_ids, responses, strict=True)],
                                 [len(s) for s in student_ids],
                                 [s.topk_ids_T_K for s in scores])
    per_token = [divergence_terms(teacher_buckets(torch.from_numpy(score.topk_logprobs_T_K),
                                                  torch.from_numpy(score.tail_logprob_T)),
                                  with_tail(torch.from_numpy(student_T_K)), beta).sum(-1).numpy()
                 for score, student_T_K in zip(scores, student, strict=True) if len(student_T_K)]
    return np.concatenate(per_token) if per_token else np.zeros(0)


def heldout_divergence(policy: Engine, teacher: Engine, prompts: list[dict], config: RunConfig, seeds: list[int],
                       top_k: int = 20, beta: float = 0.5) -> HeldoutReport:
    """Sample the policy on `prompts`, score the samples with the teacher, and average the per-token divergence."""
    tokenizer = policy.tokenizer
    student_ids = [chat_ids(tokenizer, student_messages(p, config.template)) for p in prompts]
    responses = [g.token_ids for g in policy.generate(student_ids, seeds, Sampling.of(config))]
    per_token = divergence(policy, teacher, prompts, responses, config, top_k, beta)
    return HeldoutReport(divergence=float(per_token.mean()) if len(per_token) else float("nan"),
                         tokens=int(len(per_token)), mean_length=float(np.mean([len(r) for r in responses])),
                         answers=[tokenizer.decode(r, skip_special_tokens=True) for r in responses])


def repetition_rate(token_ids: list[int], n: int = 4) -> float:
    """1 - distinct n-grams / n-grams: 0 for a response that never repeats a 4-gram, near 1 for a loop."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _word_grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def rubric_leakage(answer: str, prompt_text: str, criteria: list[str], n: int = 4) -> dict:
    """Criterion n-grams absent from the prompt that the answer repeats, and rubric words in the answer."""
    rubric_grams = set().union(*(_word_grams(c, n) for c in criteria)) if criteria else set()
    leaked = sorted(" ".join(g) for g in (rubric_grams - _word_grams(prompt_text, n)) & _word_grams(answer, n))
    return {"leaked_ngrams": leaked, "rubric_words": sorted({m.lower() for m in RUBRIC_WORDS.findall(answer)})}


def write_diagnostics(path: Path, config: RunConfig, prompts: list[dict], answers: pl.DataFrame, policy: Path,
                      base: Path, with_divergence: bool) -> dict:
    """diagnostics.json of a policy's answers: length, truncation, repetition, rubric leakage and (optionally) the
    teacher-policy JSD on them. Kept as it is while the answers and settings are the same."""
    answered = answers.filter(~pl.col("finish_reason").str.starts_with("skipped"))
    key = fingerprint({"answers": fingerprint(answered.select("prompt_id", "sample_idx", "response_token_ids").rows()),
                       "divergence": with_divergence, "beta": config.train.beta, "top_k": config.score.top_k})
    if path.exists() and json.loads(path.read_text()).get("inputs") == key:
        return json.loads(path.read_text())
    by_id = {p["prompt_id"]: p for p in prompts}
    rows = answered.to_dicts()
    leaks = [rubric_leakage(r["response_text"], " ".join(m["content"] for m in by_id[r["prompt_id"]]["messages"]),
                            [c["criterion"] for c in by_id[r["prompt_id"]]["rubric"]]) for r in rows]
    mean = lambda values: float(np.mean(values)) if rows else None  # noqa: E731
    result = {
        "inputs": key, "answers": len(rows), "skipped": answers.height - answered.height,
        "mean_length": mean([len(r["response_token_ids"]) for r in rows]),
        "truncation_rate": mean([r["finish_reason"] == "length" for r in rows]),
        "repetition_rate": mean([repetition_rate(r["response_token_ids"]) for r in rows]),
        "leakage_rate": mean([bool(x["leaked_ngrams"]) for x in leaks]),
        "rubric_word_rate": mean([bool(x["rubric_words"]) for x in leaks]),
        "leak_examples": [{"prompt_id": r["prompt_id"], **x} for r, x in zip(rows, leaks, strict=True)
                          if x["leaked_ngrams"] or x["rubric_words"]][:5],
        "divergence": None, "divergence_tokens": 0,
    }
    if with_divergence and rows:
        click.echo("evaluate: teacher–policy divergence on the answers (HF engine)")
        from rgsd_pipeline.engines.hosting import StageEngines

        engines = StageEngines("hf")  # the divergence needs log-probs of the teacher's ids: transformers
        teacher = engines.teacher(base, config)
        student = teacher if policy == base else engines.student(policy, config)
        per_token = divergence(student, teacher, [by_id[r["prompt_id"]] for r in rows],
                               [r["response_token_ids"] for r in rows], config, config.score.top_k, config.train.beta)
        result["divergence"] = float(per_token.mean()) if len(per_token) else None
        result["divergence_tokens"] = int(len(per_token))
    write_json_atomic(path, result)
    return result
