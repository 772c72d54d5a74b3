"""Stage `rollout`: the student samples on-policy responses to the training prompts.

    rgsd-pipeline rollout --run runs/t --iteration 0
    rgsd-pipeline rollout --run runs/t --iteration 1 --engine hf
    rgsd-pipeline rollout --run runs/t --iteration 0 --num-shards 4 --shard-index 2   # one of 4 workers

The policy is the base model at iteration 0, else iter-(I-1)/checkpoint. Writes iter-I/rollouts/: one
row per (prompt_id, sample_idx) with prompt and response token ids, the behaviour log-prob of every
sampled token, the text and the finish reason. Each (prompt, sample, iteration) has its own seed, so
a resumed or re-sharded run samples the same tokens. A prompt too long for the context is skipped
with the reason in `finish_reason` (or left-truncated when rollout.too_long=truncate).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import click
import polars as pl
import pyarrow as pa

from rgsd_pipeline import layout
from rgsd_pipeline.cli_options import engine_stage_options
from rgsd_pipeline.config import fingerprint, load_run_config, to_dict
from rgsd_pipeline.engines import Sampling, make_engine
from rgsd_pipeline.models import load_tokenizer, model_fingerprint, resolve_model
from rgsd_pipeline.progress import TokenProgress
from rgsd_pipeline.render import chat_ids, student_messages
from rgsd_pipeline.shards import ShardPlan, StageOutput, read_stage
from schemas import PROMPTS, ROLLOUTS


def sample_seed(base_seed: int, iteration: int, prompt_id: str, sample_idx: int) -> int:
    """A 31-bit seed that depends only on the run seed and the (iteration, prompt, sample) it samples."""
    digest = hashlib.sha256(f"{base_seed}:{iteration}:{prompt_id}:{sample_idx}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def rollout(run: Path, iteration: int, engine_kind: str | None, num_shards: int, shard_index: int) -> None:
    # 1. Inputs: the frozen config, the training prompts, the policy of this iteration.
    config = load_run_config(run)
    prompts_stage = read_stage(layout.prompts_dir(run), PROMPTS)
    train = prompts_stage.lazy().filter(pl.col("split") == "train").collect().to_dicts()
    policy = layout.policy_path(run, iteration, resolve_model(config.model.path))
    tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
    inputs = {"prompts": fingerprint(prompts_stage.manifest["shards"]), "policy": model_fingerprint(policy),
              "config": fingerprint({"rollout": to_dict(config.rollout), "template": to_dict(config.template),
                                     "max_model_len": config.model.max_model_len, "iteration": iteration})}

    # 2. The work: every (prompt, sample), cut into shards of data.rows_per_shard rows.
    work = [(p, s) for p in train for s in range(config.rollout.samples_per_prompt)]
    per_shard = config.data.rows_per_shard
    plan = ShardPlan(max(1, -(-len(work) // per_shard)), num_shards, shard_index)
    out_dir = layout.rollouts_dir(run, iteration)

    with StageOutput(out_dir, ROLLOUTS, inputs, plan) as out:
        shards = {i: work[i * per_shard:(i + 1) * per_shard] for i in out.todo()}
        if shards:
            engine = make_engine(engine_kind or config.engine.kind, policy, config.engine, config.model)
            click.echo(f"rollout iteration {iteration}: {sum(map(len, shards.values()))} samples in {len(shards)} "
                       f"shard(s) with {engine.kind} from {policy}")
            # 3. Generate shard by shard; each shard is published whole.
            sample_shards(out, shards, engine, tokenizer, config, iteration, iteration, "sample")
            engine.close()
        complete = out.finalize()

    # 4. Summary.
    if complete:
        click.echo(summary(read_stage(out_dir, ROLLOUTS).lazy()))
        click.echo(f"rollouts complete in {out_dir}")
    else:
        click.echo(f"worker {shard_index}/{num_shards} done; {out_dir} completes when every worker has finished")


def sample_shards(out: StageOutput, shards: dict[int, list[tuple[dict, int]]], engine, tokenizer, config,
                  iteration: int, seed_iteration: int, unit: str) -> None:
    """Sample the (prompt, sample_idx) items of each shard and publish every shard whole, with a progress bar."""
    advance = TokenProgress(sum(map(len, shards.values())), unit)
    for index, items in shards.items():
        rows = sample_rows(engine, tokenizer, config, items, iteration, seed_iteration, advance)
        out.write_shard(index, pa.Table.from_pylist(rows, schema=ROLLOUTS.arrow))
    advance.close()


def sample_rows(engine, tokenizer, config, items: list[tuple[dict, int]], iteration: int, seed_iteration: int,
                advance) -> list[dict]:
    """Rollout rows for (prompt, sample_idx) items: render the student view, skip or truncate prompts over
    the context budget, sample with one seed per (seed_iteration, prompt, sample), decode."""
    sampling = Sampling.of(config.rollout)
    context_budget = config.model.max_model_len - sampling.max_new_tokens
    rows = [row_for(p, s, iteration, chat_ids(tokenizer, student_messages(p, config.template))) for p, s in items]
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
    seeds = [sample_seed(config.rollout.seed, seed_iteration, r["prompt_id"], r["sample_idx"]) for r in runnable]
    generations = engine.generate([r["prompt_token_ids"] for r in runnable], seeds, sampling, advance)
    for row, generation in zip(runnable, generations):
        row["response_token_ids"] = generation.token_ids
        row["response_logprobs"] = generation.logprobs
        row["response_text"] = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
        row["finish_reason"] = generation.finish_reason
    return rows


def row_for(prompt: dict, sample_idx: int, iteration: int, prompt_ids: list[int]) -> dict:
    return {"prompt_id": prompt["prompt_id"], "sample_idx": sample_idx, "iteration": iteration,
            "prompt_token_ids": prompt_ids, "response_token_ids": [], "response_logprobs": [], "response_text": "",
            "finish_reason": ""}


def summary(rollouts: pl.LazyFrame) -> str:
    stats = rollouts.select(
        pl.len().alias("rows"), pl.col("prompt_id").n_unique().alias("prompts"),
        pl.col("response_token_ids").list.len().sum().alias("tokens"),
        pl.col("response_token_ids").list.len().mean().alias("mean_len"),
    ).collect().row(0, named=True)
    reasons = Counter(r.split(":")[0] for r in rollouts.select("finish_reason").collect()["finish_reason"])
    return (f"{stats['prompts']} prompts, {stats['rows']} samples, {stats['tokens']} tokens "
            f"(mean {stats['mean_len'] or 0:.1f}); finish: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))


@click.command("rollout")
@engine_stage_options
def command(run, iteration, engine_kind, num_shards, shard_index):
    """Sample on-policy student responses to the training prompts."""
    rollout(run, iteration, engine_kind, num_shards, shard_index)
