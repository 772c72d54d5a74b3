"""The steps of an RGSD iteration, each writing exactly the artifacts of its stage command.

    rollout(run, I, engines)   iter-I/rollouts/    the student samples its training prompts
    score(run, I, engines)     iter-I/signals/     the rubric-conditioned teacher scores the student's tokens
    train(run, I)              iter-I/checkpoint/  the student learns the teacher's signals (training.py: set up,
                                                   run, export)
    reward(run, I)             iter-I/rewards/     the judge-based baseline only (train.loss=grpo): a judge grades
                                                   each rollout, and train learns from the rewards instead

The stage commands (`rgsd-pipeline rollout | score | train`) run one step with engines built for it
(engines.hosting.StageEngines); the resident `iterate` runs them all in one process with engines kept
across iterations (ResidentEngines) and the trainer's model and AdamW state kept in memory
(`Continuation`). Either way the same shards, manifests, fingerprints and checkpoints are written, so
resume, `inspect`, `evaluate` and `report` cannot tell which path made them.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click
import polars as pl
import pyarrow as pa

from rgsd_pipeline import layout, tracking
from rgsd_pipeline.engines.base import EngineError
from rgsd_pipeline.fingerprints import tokenizer_fingerprint
from rgsd_pipeline.guidance import Contrast, other_rubrics
from rgsd_pipeline.inputs import reward_inputs, rollout_inputs, score_inputs
from rgsd_pipeline.models import eos_token_ids, load_tokenizer, resolve_model
from rgsd_pipeline.recipe import load_run_config, made_under
from rgsd_pipeline.sampling import iteration_prompts, sample_shards
from rgsd_pipeline.shards import (
    ArtifactError,
    ShardPlan,
    StageOutput,
    is_complete,
    read_stage,
    split_into_shards,
)
from rgsd_pipeline.signals import loss_mask, signals_table, storage_schema, teacher_inputs, token_span_ids, topk_bytes
from rgsd_pipeline.training import Continuation, export_policy, run_training, set_up_training, training_lock
from schemas import PROMPTS, REWARDS, ROLLOUTS


def rollout(run: Path, iteration: int, engines, num_shards: int = 1, shard_index: int = 0, world=None) -> None:
    """iter-I/rollouts/: the student's samples of this iteration's training prompts (this worker's share: shard
    J of N independent workers, or rank r of a data-parallel `world`)."""
    # 1. Inputs: the frozen config, this iteration's training prompts, the policy of this iteration.
    config = load_run_config(run)
    prompts_stage = read_stage(layout.prompts_dir(run), PROMPTS)
    train_prompts = prompts_stage.lazy().filter(pl.col("split") == "train").collect().to_dicts()
    prompts = iteration_prompts(train_prompts, iteration, config.rollout.prompts_per_iteration, config.rollout.seed)
    policy = layout.policy_path(run, iteration, resolve_model(config.model))
    tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
    inputs = rollout_inputs(run, iteration, config)

    # 2. The work: every (prompt, sample), cut into shards of data.rows_per_shard rows, at least one per worker.
    work = [(p, s) for p in prompts for s in range(config.rollout.samples_per_prompt)]
    out_dir = layout.rollouts_dir(run, iteration)
    workers = world.size if world is not None else num_shards
    pieces = split_into_shards(work, config.data.rows_per_shard, workers, StageOutput.started_shards(out_dir))
    plan = _plan(len(pieces), num_shards, shard_index, world)
    with StageOutput(out_dir, ROLLOUTS, inputs, plan, made_under(config)) as out:
        shards = {i: pieces[i] for i in out.todo()}
        if shards:
            engine = engines.student(policy, config)
            click.echo(f"rollout iteration {iteration}: {sum(map(len, shards.values()))} samples in {len(shards)} "
                       f"shard(s) ({len(prompts)} of {len(train_prompts)} training prompts) with {engine.kind} "
                       f"from {policy}")
            # 3. Generate shard by shard; each shard is published whole.
            started = time.perf_counter()
            tokens = sample_shards(out, shards, engine, tokenizer, config, iteration, seed_round=iteration,
                                   unit="sample")
            seconds = time.perf_counter() - started
            click.echo(f"sampling took {seconds:.1f} s")
            tracking.log_values(run, config, world, {"rollout/seconds": seconds, "rollout/tokens_per_s":
                                                     tokens / max(seconds, 1e-9)}, tracking.policy_step(policy))
            engines.done(engine)
        complete = out.finalize()

    # 4. Summary.
    _finished(out_dir, complete, plan, rollouts_summary(read_stage(out_dir, ROLLOUTS).lazy()) if complete else "")


def score(run: Path, iteration: int, engines, num_shards: int = 1, shard_index: int = 0, world=None) -> None:
    """iter-I/signals/: the teacher's top-k over the student's tokens, row-aligned with iter-I/rollouts/."""
    # 1. Inputs: the frozen config, the prompts (for their rubrics), this iteration's rollouts, the teacher.
    config = load_run_config(run)
    prompts = {p["prompt_id"]: p for p in read_stage(layout.prompts_dir(run), PROMPTS).lazy().collect().to_dicts()}
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS)
    teacher = resolve_model(config.model)
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
    inputs = score_inputs(run, iteration, config)
    guidance = config.score.guidance  # > 0: the rubric-guided teacher (rgsd_pipeline/guidance.py), two passes
    others = other_rubrics(list(prompts.values()), config.data.split_seed) if guidance else {}

    # 2. One signals shard per rollouts shard, so row i of shard j always describes the same rollout.
    out_dir = layout.signals_dir(run, iteration)
    plan = _plan(len(rollouts.files), num_shards, shard_index, world)
    with StageOutput(out_dir, schema, inputs, plan, made_under(config)) as out:
        todo = out.todo()
        if todo:
            from rgsd_pipeline.progress import TokenProgress

            engine = engines.teacher(teacher, config)
            for note in engine.notes:
                click.echo(note)
            total = sum(rollouts.manifest["shards"][i]["rows"] for i in todo)
            click.echo(f"score iteration {iteration}: {total} rollouts in {len(todo)} shard(s) with {engine.kind}, "
                       f"teacher {teacher}, top-{k}" + (f", rubric guidance {guidance:g} against the "
                                                        f"{config.score.guidance_negative} negative" if guidance
                                                        else ""))
            advance = TokenProgress(total, "seq")
            started = time.perf_counter()

            # 3. Per shard: teacher inputs, the teacher's top-k over the student's tokens, loss masks.
            for index in todo:
                rows = rollouts.read_shard(index).to_pylist()
                teacher_in = teacher_inputs(rows, prompts, tokenizer, config.template, config.model.max_model_len,
                                            config.score, others)
                scores = [None] * len(rows)
                try:
                    if guidance:
                        scored = engine.score_guided(teacher_in.sequences, teacher_in.prompt_lens,
                                                     Contrast(teacher_in.negatives, teacher_in.negative_lens, guidance),
                                                     k, config.score.guidance_candidates, advance)
                    else:
                        scored = engine.score(teacher_in.sequences, teacher_in.prompt_lens, k, advance)
                except EngineError as err:
                    if err.index is None:
                        raise
                    key = teacher_in.keys[teacher_in.rows[err.index]]
                    raise EngineError(f"{err} [{rollouts.files[index]} row {teacher_in.rows[err.index]}: prompt_id "
                                      f"{key['prompt_id']}, sample {key['sample_idx']}]") from None
                for row, result in zip(teacher_in.rows, scored, strict=True):
                    scores[row] = result
                masks = [loss_mask(row["response_token_ids"], eos_ids, think, config.score.eos_in_loss,
                                   row["prompt_token_ids"]) if scores[i] is not None else []
                         for i, row in enumerate(rows)]
                out.write_shard(index, signals_table(teacher_in.keys, scores, masks, schema, k))
                advance(len(rows) - len(teacher_in.rows), 0)
            advance.close()
            seconds = time.perf_counter() - started
            click.echo(f"scoring took {seconds:.1f} s")
            tracking.log_values(run, config, world, {"score/seconds": seconds, "score/tokens_per_s":
                                                     advance.tokens / max(seconds, 1e-9)}, tracking.policy_step(policy))
            engines.done(engine)
        complete = out.finalize()

    # 4. Summary: tokens, skips and storage cost per (token, k) entry.
    _finished(out_dir, complete, plan, signals_summary(read_stage(out_dir, schema), k) if complete else "")


def reward(run: Path, iteration: int, num_shards: int = 1, shard_index: int = 0, world=None) -> None:
    """iter-I/rewards/: a judge's verdicts on every rollout and its reward, row-aligned with iter-I/rollouts/ (the
    judge-based baseline, train.loss=grpo; RGSD never calls a judge in training)."""
    from rgsd_pipeline.grading import answer_score, grader_of, items_for
    from rgsd_pipeline.progress import TokenProgress

    # 1. Inputs: the frozen config, the prompts (for their rubrics), this iteration's rollouts, the judge.
    config = load_run_config(run)
    prompts = {p["prompt_id"]: p for p in read_stage(layout.prompts_dir(run), PROMPTS).lazy().collect().to_dicts()}
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS)
    grader = grader_of(config.reward, run)
    judge = " ".join(grader.identity().values())
    out_dir = layout.rewards_dir(run, iteration)
    plan = _plan(len(rollouts.files), num_shards, shard_index, world)

    # 2. One rewards shard per rollouts shard; a shard whose judge calls failed is not written (verdicts already
    #    obtained stay in the judge's cache, so a rerun asks only for the missing ones).
    with StageOutput(out_dir, REWARDS, reward_inputs(run, iteration, config), plan, made_under(config)) as out:
        todo = out.todo()
        if todo:
            total = sum(rollouts.manifest["shards"][i]["rows"] for i in todo)
            click.echo(f"reward iteration {iteration}: {total} rollouts in {len(todo)} shard(s) graded by "
                       f"{grader.describe()}")
            advance = TokenProgress(total, "rollout")
            for index in todo:
                rows = rollouts.read_shard(index).to_pylist()
                graded_rows = [r for r in rows if not r["finish_reason"].startswith("skipped")]
                failed_before = getattr(grader.stats, "failed_calls", 0)
                verdicts = dict(zip(((r["prompt_id"], r["sample_idx"]) for r in graded_rows),
                                    grader.grade(items_for(graded_rows, prompts), lambda n: advance(n, 0)),
                                    strict=True))
                failed = getattr(grader.stats, "failed_calls", 0) - failed_before
                if failed:
                    key = next(k for k, v in verdicts.items() if any(x.met is None and "judge" in x.explanation
                                                                       for x in v))
                    raise EngineError(f"{failed} judge call(s) failed while grading {rollouts.files[index]} (first: "
                                      f"prompt_id {key[0]}, sample {key[1]}) with {grader.describe()}; nothing of this "
                                      "shard was written: rerun `reward` when the judge answers (verdicts already "
                                      "given are cached)")
                out.write_shard(index, rewards_table(rows, verdicts, prompts, judge, answer_score))
                advance(len(rows) - len(graded_rows), 0)
            advance.close()
            click.echo(grader.stats.line())
        grader.close()
        complete = out.finalize()

    # 3. Summary.
    _finished(out_dir, complete, plan, rewards_summary(read_stage(out_dir, REWARDS)) if complete else "")


def rewards_table(rows: list[dict], verdicts: dict, prompts: dict, judge: str, score) -> pa.Table:
    """The rewards rows of one rollouts shard, in its order (skipped rollouts: no verdicts, no reward)."""
    table = []
    for row in rows:
        given = verdicts.get((row["prompt_id"], row["sample_idx"]), [])
        points = [float(c["points"]) for c in prompts[row["prompt_id"]]["rubric"]][:len(given)]
        met = [v.met for v in given]
        table.append({"prompt_id": row["prompt_id"], "sample_idx": row["sample_idx"],
                      "reward": score(points, met) if given else None,
                      "verdicts": [{"met": m, "points": p} for m, p in zip(met, points, strict=True)], "judge": judge})
    return pa.Table.from_pylist(table, schema=REWARDS.arrow)


def rewards_summary(stage) -> str:
    frame = stage.lazy().select("prompt_id", "reward").collect()
    rewarded = frame.filter(pl.col("reward").is_not_null())
    spread = rewarded.group_by("prompt_id").agg(pl.col("reward").std().alias("std"))
    return (f"{frame.height} rollouts, {rewarded.height} with a reward (mean {rewarded['reward'].mean() or 0:.3f}); "
            f"{spread.filter(pl.col('std') > 0).height} of {spread.height} prompts have rewards that differ (the "
            "others teach nothing)")


def train(run: Path, iteration: int, world=None, kept: Continuation | None = None,
          keep_exported: bool = False, write_state: bool = True) -> Continuation | None:
    """iter-I/checkpoint/: policy_{I+1}, trained on iter-I/signals. With `kept` (the previous iteration's model and
    optimizer in memory) nothing is reloaded; returns what to keep for the next iteration (with the exported
    weights when `keep_exported`: an engine of this process takes them without reading the checkpoint back).
    `write_state=False`: the final trainer state stays in memory only (train.state_every_iterations)."""
    from rgsd_pipeline.distributed import World

    world = world or World()
    out = layout.checkpoint_dir(run, iteration)
    with training_lock(run, iteration, world):  # one trainer per iteration: its metrics, states, checkpoint
        if is_complete(out):
            if world.main:
                click.echo(f"checkpoint already complete in {out}")
            return None
        session = set_up_training(run, iteration, world, kept)  # 1. inputs, the student, where it starts
        run_training(session)  # 2. optimizer steps, metrics, trainer state
        return export_policy(session, keep_exported, write_state)  # 3. the checkpoint the next rollout loads


def _plan(total: int, num_shards: int, shard_index: int, world) -> ShardPlan:
    """Shard J of N independent workers, or rank r's share of a data-parallel job."""
    return ShardPlan.of_world(total, world) if world is not None else ShardPlan(total, num_shards, shard_index)


def _finished(out_dir: Path, complete: bool, plan: ShardPlan, summary: str) -> None:
    if plan.group is not None and not plan.group.main:
        return
    if complete:
        click.echo(summary)
        click.echo(f"{out_dir.name} complete in {out_dir}")
    else:
        click.echo(f"worker {plan.worker_index}/{plan.num_workers} done; {out_dir} completes when every worker has "
                   "finished")


def rollouts_summary(rollouts: pl.LazyFrame) -> str:
    stats = rollouts.select(
        pl.len().alias("rows"), pl.col("prompt_id").n_unique().alias("prompts"),
        pl.col("response_token_ids").list.len().sum().alias("tokens"),
        pl.col("response_token_ids").list.len().mean().alias("mean_len"),
    ).collect().row(0, named=True)
    reasons = Counter(r.split(":")[0] for r in rollouts.select("finish_reason").collect()["finish_reason"])
    finish = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return (f"{stats['prompts']} prompts, {stats['rows']} samples, {stats['tokens']} tokens "
            f"(mean {stats['mean_len'] or 0:.1f}); finish: {finish}")


def signals_summary(stage, k: int) -> str:
    frame = stage.lazy().select(pl.col("status"), pl.col("token_logprob").list.len().alias("tokens"),
                                pl.col("loss_mask").list.sum().alias("in_loss")).collect()
    tokens = int(frame["tokens"].sum())
    disk = sum(f.stat().st_size for f in stage.files)
    skipped = frame.filter(pl.col("status") != "ok").height
    per_entry = f"{topk_bytes(stage.files) / (tokens * k):.2f}" if tokens else "n/a"
    return (f"{frame.height} rollouts ({skipped} skipped), {tokens} response tokens, {int(frame['in_loss'].sum())} in "
            f"the loss; {disk / 1e6:.2f} MB on disk; top-k columns take {per_entry} bytes per (token, k) entry")
