"""Stage `score`: the rubric-conditioned teacher's top-k log-probs over the student's own tokens.

    rgsd-pipeline score --run runs/t --iteration 0
    rgsd-pipeline score --run runs/t --iteration 0 --engine hf --num-shards 4 --shard-index 1

The teacher is always the run's base model. Its input is the teacher prompt (rubric template, chat
template, generation prompt) followed by the student's response token ids exactly as sampled, never
re-tokenized. Writes iter-I/signals/, row-aligned 1:1 with iter-I/rollouts/: per response position
the teacher's top-k ids and log-probs, its log-prob of the sampled token, and the loss mask.
"""

from __future__ import annotations

from pathlib import Path

import click
import polars as pl

from rgsd_pipeline import layout
from rgsd_pipeline.cli_options import engine_stage_options
from rgsd_pipeline.config import fingerprint, load_run_config, to_dict
from rgsd_pipeline.engines import make_engine
from rgsd_pipeline.fingerprints import model_fingerprint, tokenizer_fingerprint
from rgsd_pipeline.models import eos_token_ids, load_tokenizer, resolve_model
from rgsd_pipeline.progress import TokenProgress
from rgsd_pipeline.shards import ArtifactError, ShardPlan, StageOutput, read_stage
from rgsd_pipeline.signals import (
    loss_mask,
    signals_table,
    storage_schema,
    teacher_inputs,
    token_span_ids,
    topk_bytes,
)
from schemas import PROMPTS, ROLLOUTS


def score(run: Path, iteration: int, engine_kind: str | None, num_shards: int, shard_index: int) -> None:
    # 1. Inputs: the frozen config, the prompts (for their rubrics), this iteration's rollouts, the teacher.
    config = load_run_config(run)
    prompts = {p["prompt_id"]: p for p in read_stage(layout.prompts_dir(run), PROMPTS).lazy().collect().to_dicts()}
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS)
    teacher = resolve_model(config.model.path)
    policy = layout.policy_path(run, iteration, teacher)
    if tokenizer_fingerprint(policy) != tokenizer_fingerprint(teacher):
        raise ArtifactError(f"the student ({policy}) and the teacher ({teacher}) differ in tokenizer or chat template; "
                            "RGSD scores the student's token ids with the teacher, so both must share one")
    tokenizer = load_tokenizer(teacher, config.model.trust_remote_code)
    schema = storage_schema(config.score, len(tokenizer))
    k = config.score.top_k
    think = ((token_span_ids(tokenizer, config.score.think_open), token_span_ids(tokenizer, config.score.think_close))
             if config.score.think_mask else None)
    eos_ids = eos_token_ids(teacher, tokenizer)
    inputs = {"rollouts": fingerprint(rollouts.manifest["shards"]), "teacher": model_fingerprint(teacher),
              "config": fingerprint({"score": to_dict(config.score), "template": to_dict(config.template),
                                     "max_model_len": config.model.max_model_len})}

    # 2. One signals shard per rollouts shard, so row i of shard j always describes the same rollout.
    out_dir = layout.signals_dir(run, iteration)
    plan = ShardPlan(len(rollouts.files), num_shards, shard_index)
    with StageOutput(out_dir, schema, inputs, plan) as out:
        todo = out.todo()
        if todo:
            kind = engine_kind or config.engine.score_kind or config.engine.kind
            engine = make_engine(kind, teacher, config.engine, config.model, max_logprobs=k)
            total = sum(rollouts.manifest["shards"][i]["rows"] for i in todo)
            click.echo(f"score iteration {iteration}: {total} rollouts in {len(todo)} shard(s) with {engine.kind}, "
                       f"teacher {teacher}, top-{k}")
            advance = TokenProgress(total, "seq")

            # 3. Per shard: teacher inputs, the teacher's top-k over the student's tokens, loss masks.
            for index in todo:
                rows = rollouts.read_shard(index).to_pylist()
                teacher_in = teacher_inputs(rows, prompts, tokenizer, config.template, config.model.max_model_len)
                scores = [None] * len(rows)
                for row, result in zip(teacher_in.rows, engine.score(teacher_in.sequences, teacher_in.prompt_lens, k,
                                                                     advance)):
                    scores[row] = result
                masks = [loss_mask(row["response_token_ids"], eos_ids, think, config.score.eos_in_loss,
                                   row["prompt_token_ids"]) if scores[i] is not None else []
                         for i, row in enumerate(rows)]
                out.write_shard(index, signals_table(teacher_in.keys, scores, masks, schema, k))
                advance(len(rows) - len(teacher_in.rows), 0)
            advance.close()
            engine.close()
        complete = out.finalize()

    # 4. Summary: tokens, skips and storage cost per (token, k) entry.
    if complete:
        click.echo(summary(read_stage(out_dir, schema), k))
        click.echo(f"signals complete in {out_dir}")
    else:
        click.echo(f"worker {shard_index}/{num_shards} done; {out_dir} completes when every worker has finished")


def summary(stage, k: int) -> str:
    frame = stage.lazy().select(pl.col("status"), pl.col("token_logprob").list.len().alias("tokens"),
                                pl.col("loss_mask").list.sum().alias("in_loss")).collect()
    tokens = int(frame["tokens"].sum())
    disk = sum(f.stat().st_size for f in stage.files)
    skipped = frame.filter(pl.col("status") != "ok").height
    per_entry = f"{topk_bytes(stage.files) / (tokens * k):.2f}" if tokens else "n/a"
    return (f"{frame.height} rollouts ({skipped} skipped), {tokens} response tokens, {int(frame['in_loss'].sum())} in "
            f"the loss; {disk / 1e6:.2f} MB on disk; top-k columns take {per_entry} bytes per (token, k) entry")


@click.command("score")
@engine_stage_options
def command(run, iteration, engine_kind, num_shards, shard_index):
    """Score the student's rollouts with the rubric-conditioned teacher."""
    score(run, iteration, engine_kind, num_shards, shard_index)
