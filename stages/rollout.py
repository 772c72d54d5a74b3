"""Stage `rollout`: the student samples on-policy responses to the training prompts.

    rgsd-pipeline rollout --run runs/t --iteration 0
    rgsd-pipeline rollout --run runs/t --iteration 1 --engine hf
    rgsd-pipeline rollout --run runs/t --iteration 0 --num-shards 4 --shard-index 2   # one of 4 workers

The policy is the base model at iteration 0, else iter-(I-1)/checkpoint. The prompts are every training
prompt, or this iteration's slice of them when rollout.prompts_per_iteration is set (see
rgsd_pipeline/sampling.py). Writes iter-I/rollouts/: one row per (prompt_id, sample_idx) with prompt and
response token ids, the log-probs of every sampled token (the model's own, and the distribution it was
drawn from), the text and the finish reason. Each (prompt, sample, iteration) has its own seed, so a
resumed or re-sharded run samples the same tokens. A prompt too long for the context is skipped with the
reason in `finish_reason` (or left-truncated when rollout.too_long=truncate).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
import polars as pl

from rgsd_pipeline import layout
from rgsd_pipeline.cli_options import engine_stage_options
from rgsd_pipeline.config import fingerprint, load_run_config, to_dict
from rgsd_pipeline.engines import Sampling, make_engine
from rgsd_pipeline.fingerprints import model_fingerprint
from rgsd_pipeline.models import load_tokenizer, resolve_model
from rgsd_pipeline.sampling import iteration_prompts, sample_shards
from rgsd_pipeline.shards import ShardPlan, StageOutput, read_stage, split_into_shards
from schemas import PROMPTS, ROLLOUTS


def rollout(run: Path, iteration: int, engine_kind: str | None, num_shards: int, shard_index: int) -> None:
    # 1. Inputs: the frozen config, this iteration's training prompts, the policy of this iteration.
    config = load_run_config(run)
    prompts_stage = read_stage(layout.prompts_dir(run), PROMPTS)
    train = prompts_stage.lazy().filter(pl.col("split") == "train").collect().to_dicts()
    prompts = iteration_prompts(train, iteration, config.rollout.prompts_per_iteration, config.rollout.seed)
    policy = layout.policy_path(run, iteration, resolve_model(config.model.path))
    tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
    inputs = {"prompts": fingerprint(prompts_stage.manifest["shards"]), "policy": model_fingerprint(policy),
              "config": fingerprint({"rollout": to_dict(config.rollout), "template": to_dict(config.template),
                                     "max_model_len": config.model.max_model_len, "iteration": iteration})}

    # 2. The work: every (prompt, sample), cut into shards of data.rows_per_shard rows.
    work = [(p, s) for p in prompts for s in range(config.rollout.samples_per_prompt)]
    pieces = split_into_shards(work, config.data.rows_per_shard)
    out_dir = layout.rollouts_dir(run, iteration)

    with StageOutput(out_dir, ROLLOUTS, inputs, ShardPlan(len(pieces), num_shards, shard_index)) as out:
        shards = {i: pieces[i] for i in out.todo()}
        if shards:
            engine = make_engine(engine_kind or config.engine.kind, policy, config.engine, config.model,
                                 sampling=Sampling.of(config.rollout))
            click.echo(f"rollout iteration {iteration}: {sum(map(len, shards.values()))} samples in {len(shards)} "
                       f"shard(s) ({len(prompts)} of {len(train)} training prompts) with {engine.kind} from {policy}")
            # 3. Generate shard by shard; each shard is published whole.
            sample_shards(out, shards, engine, tokenizer, config, iteration, seed_round=iteration, unit="sample")
            engine.close()
        complete = out.finalize()

    # 4. Summary.
    if complete:
        click.echo(summary(read_stage(out_dir, ROLLOUTS).lazy()))
        click.echo(f"rollouts complete in {out_dir}")
    else:
        click.echo(f"worker {shard_index}/{num_shards} done; {out_dir} completes when every worker has finished")


def summary(rollouts: pl.LazyFrame) -> str:
    stats = rollouts.select(
        pl.len().alias("rows"), pl.col("prompt_id").n_unique().alias("prompts"),
        pl.col("response_token_ids").list.len().sum().alias("tokens"),
        pl.col("response_token_ids").list.len().mean().alias("mean_len"),
    ).collect().row(0, named=True)
    reasons = Counter(r.split(":")[0] for r in rollouts.select("finish_reason").collect()["finish_reason"])
    finish = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return (f"{stats['prompts']} prompts, {stats['rows']} samples, {stats['tokens']} tokens "
            f"(mean {stats['mean_len'] or 0:.1f}); finish: {finish}")


@click.command("rollout")
@engine_stage_options
def command(run, iteration, engine_kind, num_shards, shard_index):
    """Sample on-policy student responses to the training prompts."""
    rollout(run, iteration, engine_kind, num_shards, shard_index)
