"""Polars views of a run for looking at what the teacher said about the student's tokens.

    from rgsd_pipeline import inspect
    t = inspect.tokens("runs/demo", 0)            # LazyFrame, one row per response token
    t.sort("logprob_gap", descending=True).head(20).collect()
    inspect.rollouts("runs/demo", 0).collect()    # one row per rollout
    inspect.iterations("runs/demo")               # one row per policy: rollouts, training, evaluation

`logprob_gap` of a token is log π_student(y_t) − log π_teacher(y_t) for the token the student sampled:
the one-sample estimate of the reverse KL at that position. It is large where the student was sure of a
token that the rubric-conditioned teacher found unlikely. The student's log-prob is the policy's own
(temperature 1) recorded at sampling; the teacher's comes from the signals shards. The teacher's top-k
log-probs are decoded as each shard's `rgsd.encoding` metadata says and rescaled so that, with the stored
tail mass, they sum to 1 (the distribution training sees).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import polars as pl

from rgsd_pipeline import layout
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import StageData, is_complete, manifest_mtime, read_stage
from rgsd_pipeline.signals import read_encoding
from schemas import ROLLOUTS

_VERIFIED: dict[tuple[str, int], StageData] = {}


def _stage(folder: Path, schema) -> StageData:
    """read_stage, whose checksum pass over every shard runs once per output as long as its manifest is unchanged;
    the views below read the same outputs several times."""
    key = (str(folder), manifest_mtime(folder))
    if key not in _VERIFIED:
        _VERIFIED[key] = read_stage(folder, schema)
    return _VERIFIED[key]


def rollouts_stage(run: Path, iteration: int) -> StageData:
    return _stage(layout.rollouts_dir(run, iteration), ROLLOUTS)


def signals_stage(run: Path, iteration: int) -> StageData:
    from rgsd_pipeline.signals import storage_schema

    schema = storage_schema(load_run_config(run).score, vocabulary(run).height)
    return _stage(layout.signals_dir(run, iteration), schema)


def _signals(run: Path, iteration: int) -> pl.LazyFrame:
    return signals_stage(run, iteration).lazy()


@lru_cache(maxsize=4)
def _vocabulary(model_path: str, trust_remote_code: bool) -> pl.DataFrame:
    """token_id -> the text of that one token (a partial UTF-8 character shows as U+FFFD)."""
    from rgsd_pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(Path(model_path), trust_remote_code)
    size = len(tokenizer)
    return pl.DataFrame({"token_id": pl.Series(range(size), dtype=pl.Int64),
                         "token": tokenizer.batch_decode([[i] for i in range(size)])})


def vocabulary(run: Path) -> pl.DataFrame:
    from rgsd_pipeline.models import resolve_model

    config = load_run_config(run)
    return _vocabulary(str(resolve_model(config.model)), config.model.trust_remote_code)


def _decoded(column: str, tail: str, encoding: dict) -> pl.Expr:
    """Stored teacher log-probs as float32, as the shard's encoding says (uint8 codes: -(code / scale)^2), then
    rescaled so that top-k + tail = 1: topk + log(1 - exp(tail)) - logsumexp(topk)."""
    values = pl.col(column).cast(pl.List(pl.Float32))
    scale = encoding["topk_logprobs"]["scale"]
    if scale is not None:
        values = values.list.eval(-(pl.element() / scale) ** 2)
    logsumexp = values.list.eval(pl.element().exp()).list.sum().log()
    return values + ((-pl.col(tail).exp()).log1p() - logsumexp)


def tokens(run: Path, iteration: int) -> pl.LazyFrame:
    """One row per response token of iteration `iteration` that the teacher scored.

    Columns: prompt_id, sample_idx, position, token_id, token, policy_logprob (the policy's own, temperature
    1), sampling_logprob (the distribution it was drawn from; null where the rollout did not record it),
    teacher_logprob, logprob_gap, mask,
    teacher_top1_id, teacher_top1, teacher_topk_ids (list), teacher_topk_logprobs (list, decoded and
    rescaled), teacher_tail_mass, and with score.guidance the two passes behind the guided teacher_logprob:
    rubric_logprob (the rubric pass alone) and negative_logprob (null without guidance).
    """
    run = Path(run)
    rollouts = rollouts_stage(run, iteration).lazy().select(
        "prompt_id", "sample_idx", "response_token_ids", "response_logprobs",
        pl.col("sampling_logprobs").fill_null(  # one null per token, so that the lists explode together
            pl.col("response_logprobs").list.eval(pl.element() * pl.lit(None, pl.Float32))))
    stage = signals_stage(run, iteration)
    encoding = read_encoding(stage.files[0])
    nulls = pl.col("token_logprob").list.eval(pl.element() * pl.lit(None, pl.Float32))  # explode with the rest
    signals = stage.lazy().filter(pl.col("status") == "ok").select(
        "prompt_id", "sample_idx", "token_logprob", "tail_logprob", "loss_mask",
        pl.col("rubric_token_logprob").fill_null(nulls).alias("rubric_logprob"),
        pl.col("negative_token_logprob").fill_null(nulls).alias("negative_logprob"),
        pl.col("topk_ids").cast(pl.List(pl.List(pl.Int64))).alias("teacher_topk_ids"),
        pl.col("topk_logprobs").cast(pl.List(pl.List(pl.Float32))).alias("teacher_topk_logprobs"))
    vocab = vocabulary(run).lazy()
    frame = (
        rollouts.join(signals, on=["prompt_id", "sample_idx"], how="inner")
        .with_columns(position=pl.int_ranges(0, pl.col("response_token_ids").list.len()))
        .explode(["position", "response_token_ids", "response_logprobs", "sampling_logprobs", "token_logprob",
                  "tail_logprob", "loss_mask", "teacher_topk_ids", "teacher_topk_logprobs", "rubric_logprob",
                  "negative_logprob"])
        .rename({"response_token_ids": "token_id", "response_logprobs": "policy_logprob",
                 "sampling_logprobs": "sampling_logprob", "token_logprob": "teacher_logprob", "loss_mask": "mask"})
        .with_columns(pl.col("token_id").cast(pl.Int64),
                      logprob_gap=pl.col("policy_logprob") - pl.col("teacher_logprob"),
                      teacher_top1_id=pl.col("teacher_topk_ids").list.first(),
                      teacher_topk_logprobs=_decoded("teacher_topk_logprobs", "tail_logprob", encoding),
                      teacher_tail_mass=pl.col("tail_logprob").exp())
    )
    frame = (frame.join(vocab, on="token_id", how="left")
             .join(vocab.rename({"token_id": "teacher_top1_id", "token": "teacher_top1"}), on="teacher_top1_id",
                   how="left"))
    return frame.select("prompt_id", "sample_idx", "position", "token_id", "token", "policy_logprob",
                        "sampling_logprob", "teacher_logprob", "logprob_gap", "mask", "teacher_top1_id", "teacher_top1",
                        "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass", "rubric_logprob",
                        "negative_logprob")


def rollouts(run: Path, iteration: int) -> pl.LazyFrame:
    """One row per rollout: text, length, finish reason, scoring status and its mean log-prob gap over the loss mask."""
    run = Path(run)
    rows = rollouts_stage(run, iteration).lazy().select(
        "prompt_id", "sample_idx", "response_text", "finish_reason",
        pl.col("response_token_ids").list.len().alias("length"),
        pl.col("response_logprobs").list.mean().alias("policy_logprob_mean"))
    status = _signals(run, iteration).select("prompt_id", "sample_idx", "status")
    per_token = tokens(run, iteration).filter(pl.col("mask")).group_by("prompt_id", "sample_idx").agg(
        masked_tokens=pl.len(), teacher_logprob_mean=pl.col("teacher_logprob").mean(),
        logprob_gap_mean=pl.col("logprob_gap").mean())
    return (rows.join(status, on=["prompt_id", "sample_idx"], how="left")
            .join(per_token, on=["prompt_id", "sample_idx"], how="left")
            .with_columns(pl.col("masked_tokens").fill_null(0)))


def iterations(run: Path, eval_set: str = "heldout") -> pl.DataFrame:
    """One row per policy (base, iter-000, ...): its training rollouts (sampled in the iteration it starts),
    the training metrics of that iteration, and its evaluation on `eval_set` (diagnostics and judge scores:
    `score[judge]` with its 95% interval `score_low[judge]` / `score_high[judge]`, per domain
    `score[judge:domain]`, and `unparsed[judge]`)."""
    run = Path(run)
    policies = set(layout.iterations(run))  # policy I samples iteration I's rollouts
    policies |= {i + 1 for i in policies if is_complete(layout.checkpoint_dir(run, i))}
    policies |= {layout.policy_index(label) for label in layout.eval_labels(run, eval_set)}
    rows = []
    for policy in sorted(policies):
        label = layout.policy_label(policy)
        row = {"policy": label, "index": policy}
        sampled_in_run = policy != layout.TEACHER  # the teacher itself has evaluations only, no rollouts or training
        if sampled_in_run and is_complete(layout.rollouts_dir(run, policy)):
            row.update(rollouts_stage(run, policy).lazy().select(
                pl.len().alias("rollouts"), pl.col("response_token_ids").list.len().mean().alias("rollout_length"),
                (pl.col("finish_reason") == "length").mean().alias("rollout_truncation")).collect().row(0, named=True))
            if is_complete(layout.signals_dir(run, policy)):
                row.update(tokens(run, policy).filter(pl.col("mask")).select(
                    pl.col("logprob_gap").mean().alias("sampled_logprob_gap"),
                    pl.col("teacher_logprob").mean().alias("teacher_logprob")).collect().row(0, named=True))
        metrics_path = layout.metrics_file(run, policy)
        if sampled_in_run and metrics_path.exists():
            from rgsd_pipeline.training import read_metrics

            steps = read_metrics(metrics_path)
            if steps and "divergence" in steps[0]:
                row.update(train_steps=len(steps), train_divergence_first=steps[0]["divergence"],
                           train_divergence_last=steps[-1]["divergence"])
        diagnostics = layout.diagnostics_file(run, eval_set, label)
        if diagnostics.exists():
            d = json.loads(diagnostics.read_text())
            row.update(heldout_divergence=d.get("divergence"), eval_length=d.get("mean_length"),
                       eval_truncation=d.get("truncation_rate"), eval_repetition=d.get("repetition_rate"),
                       eval_leakage=d.get("leakage_rate"))
        for judge, path in layout.summary_judges(layout.eval_dir(run, eval_set, label)).items():
            s = json.loads(path.read_text())
            row.update({f"score[{judge}]": s["overall"]["mean"], f"score_low[{judge}]": s["overall"]["low"],
                        f"score_high[{judge}]": s["overall"]["high"], f"unparsed[{judge}]": s["unparseable"],
                        **{f"score[{judge}:{domain}]": v["mean"] for domain, v in s["domains"].items()}})
        rows.append(row)
    return pl.DataFrame(rows) if rows else pl.DataFrame({"policy": [], "index": []})


TABLE_COLUMNS = {"policy": "policy", "rollouts": "rollouts", "rollout_length": "length", "rollout_truncation": "trunc",
                 "sampled_logprob_gap": "sampled gap", "train_divergence_first": "train div first",
                 "train_divergence_last": "train div last", "heldout_divergence": "held-out JSD",
                 "eval_length": "eval length", "eval_truncation": "eval trunc", "eval_repetition": "eval repeat",
                 "eval_leakage": "eval leak"}


def format_policies(frame: pl.DataFrame, evaluated_only: bool = False) -> str:
    """The per-policy frame as a printable table; judge scores as `score [low, high]` per judge."""
    if evaluated_only and "eval_length" in frame.columns:
        frame = frame.filter(pl.col("eval_length").is_not_null())
    judges = [c[len("score["):-1] for c in frame.columns if c.startswith("score[") and ":" not in c]
    for judge in judges:
        # a summary whose every verdict was unusable has no score (a null column): shown as such, not an error
        scores = (pl.col(f"{k}[{judge}]").cast(pl.Float64).round(3) for k in ("score", "score_low", "score_high"))
        frame = frame.with_columns(pl.format("{} [{}, {}]", *scores).fill_null("no score").alias(f"judge {judge}"))
    names = {c: TABLE_COLUMNS[c] for c in TABLE_COLUMNS if c in frame.columns}
    names.update({f"judge {judge}": f"rubric score, {judge} [95% interval]" for judge in judges})
    with pl.Config(tbl_rows=100, tbl_cols=len(names), tbl_width_chars=200, float_precision=4,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        return str(frame.select(list(names)).rename(names))
