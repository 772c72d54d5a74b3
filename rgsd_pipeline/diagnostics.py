"""Judge-free diagnostics: how far a policy is from the rubric-conditioned teacher on held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rgsd_pipeline.engines import Sampling
from rgsd_pipeline.engines.hf_engine import HfEngine
from rgsd_pipeline.losses import divergence_terms, with_tail
from rgsd_pipeline.render import chat_ids, student_messages, teacher_messages


@dataclass
class HeldoutReport:
    divergence: float  # mean per-token JSD(β) between teacher and policy over the policy's own samples
    tokens: int
    mean_length: float
    answers: list[str]  # the policy's responses, in prompt order


def heldout_divergence(policy: HfEngine, teacher: HfEngine, prompts: list[dict], config, seeds: list[int],
                       top_k: int = 20, beta: float = 0.5) -> HeldoutReport:
    """Sample the policy on `prompts`, score the samples with the teacher, and average the per-token divergence."""
    sampling = Sampling(temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
                        max_new_tokens=config.rollout.max_new_tokens,
                        repetition_penalty=config.rollout.repetition_penalty)
    tokenizer = policy.tokenizer
    student_ids = [chat_ids(tokenizer, student_messages(p, config.template)) for p in prompts]
    generations = policy.generate(student_ids, seeds, sampling)
    responses = [g.token_ids for g in generations]
    teacher_ids = [chat_ids(tokenizer, teacher_messages(p, config.template)) for p in prompts]
    scores = teacher.score([t + r for t, r in zip(teacher_ids, responses)], [len(t) for t in teacher_ids], top_k)
    student = policy.logprobs_at([s + r for s, r in zip(student_ids, responses)], [len(s) for s in student_ids],
                                 [s.topk_ids_T_K for s in scores])
    per_token = []
    for score, student_T_K in zip(scores, student):
        if len(student_T_K):
            terms = divergence_terms(with_tail(torch.from_numpy(score.topk_logprobs_T_K)),
                                     with_tail(torch.from_numpy(student_T_K)), beta)
            per_token.append(terms.sum(-1).numpy())
    all_tokens = np.concatenate(per_token) if per_token else np.zeros(0)
    return HeldoutReport(divergence=float(all_tokens.mean()) if len(all_tokens) else float("nan"),
                         tokens=int(len(all_tokens)), mean_length=float(np.mean([len(r) for r in responses])),
                         answers=[tokenizer.decode(r, skip_special_tokens=True) for r in responses])
