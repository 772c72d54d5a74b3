"""Sampling a policy: which prompts an iteration samples, one seed per sample, rows written shard by shard.

An iteration samples `rollout.prompts_per_iteration` training prompts (0: all of them). The prompts are
taken in a seeded order, a new one per epoch, in consecutive slices: iteration i is slice i mod E of
epoch i // E, where E = ceil(prompts / per_iteration). Every prompt is sampled exactly once per epoch,
a slice never spans two epochs (the last slice of an epoch may be shorter), and a slice depends only on
the seed and the iteration number, so a resumed or sharded run samples the same prompts.

Each (prompt, sample) draws from its own seed, derived from the run seed, the prompt, the sample index
and a seed round: the iteration for rollouts, EVAL_SEED_ROUND for evaluation answers, so that every
policy answers a held-out prompt with the same seed (paired samples).
"""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa

from rgsd_pipeline.config import RolloutConfig, RunConfig, TrainConfig
from rgsd_pipeline.engines import Engine, Sampling
from rgsd_pipeline.progress import TokenProgress
from rgsd_pipeline.render import chat_ids, student_messages
from rgsd_pipeline.shards import StageOutput
from schemas import ROLLOUTS

EVAL_SEED_ROUND = -1


def _draw(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def sample_seed(base_seed: int, prompt_id: str, sample_idx: int, *, seed_round: int) -> int:
    """A 31-bit seed that depends only on the run seed, the seed round and the (prompt, sample) it samples."""
    return _draw(f"{base_seed}:{seed_round}:{prompt_id}:{sample_idx}")


def slice_sizes(num_prompts: int, per_iteration: int) -> list[int]:
    """How many prompts each iteration of one epoch samples."""
    if per_iteration == 0 or per_iteration >= num_prompts:
        return [num_prompts]
    full, rest = divmod(num_prompts, per_iteration)
    return [per_iteration] * full + ([rest] if rest else [])


def iteration_prompts(prompts: list[dict], iteration: int, per_iteration: int, seed: int) -> list[dict]:
    """The prompts iteration `iteration` samples: all of them, or its slice of this epoch's seeded order."""
    sizes = slice_sizes(len(prompts), per_iteration)
    if len(sizes) == 1:
        return list(prompts)
    epoch, slot = divmod(iteration, len(sizes))
    order = sorted(prompts, key=lambda p: (_draw(f"order:{seed}:{epoch}:{p['prompt_id']}"), p["prompt_id"]))
    start = slot * per_iteration
    return order[start:start + sizes[slot]]


def iterations_per_epoch(num_prompts: int, per_iteration: int) -> int:
    return len(slice_sizes(num_prompts, per_iteration))


def optimizer_steps_per_epoch(num_prompts: int, rollout_config: RolloutConfig, train_config: TrainConfig) -> int:
    """Optimizer steps of one pass over the training prompts at this cadence (every rollout trainable)."""
    samples = rollout_config.samples_per_prompt
    return sum(math.ceil(size * samples / train_config.batch_size) * train_config.epochs
               for size in slice_sizes(num_prompts, rollout_config.prompts_per_iteration))


def row_for(prompt: dict, sample_idx: int, iteration: int, prompt_ids: list[int]) -> dict:
    """An empty rollouts row for one (prompt, sample)."""
    return {"prompt_id": prompt["prompt_id"], "sample_idx": sample_idx, "iteration": iteration,
            "prompt_token_ids": prompt_ids, "response_token_ids": [], "response_logprobs": [], "sampling_logprobs": [],
            "response_text": "", "finish_reason": ""}


def sample_rows(engine: Engine, tokenizer, config: RunConfig, items: list[tuple[dict, int]], iteration: int,
                seed_round: int, advance, view=student_messages, negative_view=None) -> list[dict]:
    """Rollout rows for (prompt, sample_idx) items: render the view (the student's; render.teacher_messages to
    sample the teacher itself), skip or truncate prompts over the context budget, sample with one seed per
    (seed round, prompt, sample), decode. `negative_view` (a prompt -> messages): sample the rubric-guided teacher
    against it at score.guidance (rgsd_pipeline/guidance.py)."""
    from rgsd_pipeline.guidance import Contrast

    sampling = Sampling.of(config)
    context_budget = config.model.max_model_len - sampling.max_new_tokens
    rows = [row_for(p, s, iteration, chat_ids(tokenizer, view(p, config.template))) for p, s in items]
    negatives = {} if negative_view is None else {
        id(row): chat_ids(tokenizer, negative_view(p))[-context_budget:]
        for row, (p, _) in zip(rows, items, strict=True)}
    runnable = []
    for row in rows:
        length = len(row["prompt_token_ids"])
        if length > context_budget:
            if config.rollout.too_long == "skip":
                row["finish_reason"] = (f"skipped:prompt is {length} tokens, over model.max_model_len - "
                                        f"rollout.max_new_tokens = {context_budget}")
                advance(1, 0)
                continue
            row["prompt_token_ids"] = row["prompt_token_ids"][-context_budget:]
        runnable.append(row)
    seeds = [sample_seed(config.rollout.seed, r["prompt_id"], r["sample_idx"], seed_round=seed_round) for r in runnable]
    contrast = None if negative_view is None else Contrast([negatives[id(r)] for r in runnable], [],
                                                           config.score.guidance)
    generations = engine.generate([r["prompt_token_ids"] for r in runnable], seeds, sampling, advance,
                                  **({"contrast": contrast} if contrast else {}))
    for row, generation in zip(runnable, generations, strict=True):
        row["response_token_ids"] = generation.token_ids
        row["response_logprobs"] = generation.logprobs
        row["sampling_logprobs"] = generation.sampling_logprobs
        row["response_text"] = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
        row["finish_reason"] = generation.finish_reason
    return rows


def sample_shards(out: StageOutput, shards: dict[int, list[tuple[dict, int]]], engine: Engine, tokenizer,
                  config: RunConfig, iteration: int, seed_round: int, unit: str, view=student_messages,
                  negative_view=None) -> int:
    """Sample the (prompt, sample_idx) items of each shard and publish every shard whole, with a progress bar; returns
    the tokens sampled."""
    advance = TokenProgress(sum(map(len, shards.values())), unit)
    for index, items in shards.items():
        rows = sample_rows(engine, tokenizer, config, items, iteration, seed_round, advance, view, negative_view)
        out.write_shard(index, pa.Table.from_pylist(rows, schema=ROLLOUTS.arrow))
    advance.close()
    return advance.tokens
