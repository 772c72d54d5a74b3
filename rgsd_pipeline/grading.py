"""Grading a policy's answers with a judge, and rubric scores from the verdicts (HealthBench convention).

Score of one answer = points of the criteria it meets (negative criteria subtract) / the positive
points available. Criteria whose verdict could not be parsed are left out of both sums and counted;
an answer with no parsed positive criterion has no score. A prompt's score is the mean over its
answers; a mean over prompts is clipped to [0, 1], and its interval is a percentile bootstrap over
prompts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np
import polars as pl
import pyarrow as pa

from rgsd_pipeline import layout
from rgsd_pipeline.fingerprints import fingerprint
from rgsd_pipeline.judge import Criterion, Item
from rgsd_pipeline.progress import TokenProgress
from rgsd_pipeline.shards import ShardPlan, StageData, StageOutput, read_stage, write_json_atomic
from schemas import EVAL_VERDICTS


def answer_scores(verdicts: pl.DataFrame) -> pl.DataFrame:
    """One row per (prompt_id, sample_idx): achieved, possible, score, criteria, unparseable."""
    parsed = pl.col("met").is_not_null()
    return (
        verdicts.group_by("prompt_id", "sample_idx", maintain_order=True)
        .agg(achieved=pl.col("points").filter(parsed & pl.col("met")).sum().cast(pl.Float64),
             possible=pl.col("points").filter(parsed & (pl.col("points") > 0)).sum().cast(pl.Float64),
             criteria=pl.len(), unparseable=(~parsed).sum())
        .with_columns(score=pl.when(pl.col("possible") > 0).then(pl.col("achieved") / pl.col("possible")))
    )


def prompt_scores(answers: pl.DataFrame) -> pl.DataFrame:
    """One row per prompt: the mean score of its answers (answers without a score left out)."""
    return answers.group_by("prompt_id", maintain_order=True).agg(score=pl.col("score").mean())


def clipped_mean(values: np.ndarray) -> float:
    return float(np.clip(values.mean(), 0.0, 1.0)) if len(values) else float("nan")


def interval(values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95,
             clip: bool = True) -> dict:
    """Mean with a percentile bootstrap interval over the given per-prompt values, clipped to [0, 1] for scores
    (`clip=False` for differences of scores)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    means = np.clip(means, 0.0, 1.0) if clip else means
    tail = (1 - level) / 2 * 100
    return {"mean": clipped_mean(values) if clip else float(values.mean()), "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "n": int(len(values))}


def summarize(verdicts: pl.DataFrame, domains: dict[str, str], resamples: int = 1000, seed: int = 0) -> dict:
    """Overall and per-domain clipped means with intervals, and the counts behind them."""
    answers = answer_scores(verdicts)
    prompts = prompt_scores(answers).with_columns(
        domain=pl.col("prompt_id").replace_strict(domains, default="-", return_dtype=pl.String))
    out = {"overall": interval(prompts["score"].fill_null(np.nan).to_numpy(), resamples, seed),
           "domains": {}, "answers": answers.height,
           "answers_without_score": int(answers["score"].null_count()),
           "criteria": int(answers["criteria"].sum()), "unparseable": int(answers["unparseable"].sum())}
    for domain in sorted(prompts["domain"].unique()):
        scores = prompts.filter(pl.col("domain") == domain)["score"].fill_null(np.nan).to_numpy()
        out["domains"][domain] = interval(scores, resamples, seed)
    return out


def paired_difference(after: pl.DataFrame, before: pl.DataFrame, resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """After minus before over the prompts both policies have a score on, as the rows show them: the difference of
    the two clipped means (so it is exactly the difference of the table's rows when both cover the same prompts),
    with a paired percentile bootstrap interval (the same prompts resampled for both)."""
    a, b = (prompt_scores(answer_scores(v)).drop_nulls("score") for v in (after, before))
    both = a.join(b, on="prompt_id", suffix="_before")
    after_P, before_P = (both[c].to_numpy().astype(np.float64) for c in ("score", "score_before"))
    if not len(after_P):
        return {"mean": None, "low": None, "high": None, "n": 0}
    draws = np.random.default_rng(seed).integers(0, len(after_P), size=(resamples, len(after_P)))
    clipped = lambda values: np.clip(values, 0.0, 1.0)  # noqa: E731
    differences = clipped(after_P[draws].mean(axis=1)) - clipped(before_P[draws].mean(axis=1))
    tail = (1 - level) / 2 * 100
    return {"mean": clipped_mean(after_P) - clipped_mean(before_P), "low": float(np.percentile(differences, tail)),
            "high": float(np.percentile(differences, 100 - tail)), "n": int(len(after_P))}


class OtherCriteria:
    """A grader of the same answers against another data set's criteria for their questions (evaluate
    --also-grade): its verdicts and summary go under its own name, and its identity names the criteria's source."""

    def __init__(self, grader, name: str, source: str):
        self.grader, self.name, self.source = grader, f"{grader.name}-{name}", source

    @property
    def stats(self):
        return self.grader.stats

    def identity(self) -> dict:
        return {**self.grader.identity(), "criteria": self.source}

    def describe(self) -> str:
        return f"{self.grader.describe()}, on the criteria of {self.source}"

    def grade(self, items, on_progress=None):
        return self.grader.grade(items, on_progress)

    def close(self) -> None:
        self.grader.close()


def make_grader(judge, run: Path):
    """The grader for a judge: "rules" (the rule judge), or JudgeSettings (an LLM judge, its verdicts cached in the
    run's judge cache)."""
    if judge == "rules":
        from rgsd_pipeline.rule_judge import RuleJudge

        return RuleJudge()
    from rgsd_pipeline.judge import Judge, VerdictCache

    return Judge(judge, VerdictCache(layout.judge_cache(run)))


def items_for(rows: list[dict], prompts_by_id: dict[str, dict]) -> list[Item]:
    """What a grader grades: each rollouts-schema row's text against its prompt's conversation and rubric."""
    return [Item(prompt_id=r["prompt_id"], messages=tuple(prompts_by_id[r["prompt_id"]]["messages"]),
                 answer=r["response_text"],
                 criteria=tuple(Criterion(c["criterion"], float(c["points"]), tuple(c["tags"]))
                                for c in prompts_by_id[r["prompt_id"]]["rubric"])) for r in rows]


def answer_score(points: list[float], met: list[bool | None]) -> float | None:
    """One answer's score: points of the met criteria (met pitfalls subtract) over the positive points of the graded
    ones; None when no positive criterion was graded. The same arithmetic as answer_scores."""
    graded = [(p, m) for p, m in zip(points, met, strict=True) if m is not None]
    possible = sum(p for p, _ in graded if p > 0)
    return sum(p for p, m in graded if m) / possible if possible > 0 else None


def grader_of(reward_config, run: Path):
    """The grader a run's reward stage uses (reward.judge), built as evaluate builds its judge."""
    if reward_config.judge == "rules":
        return make_grader("rules", run)
    from rgsd_pipeline.judge import JudgeSettings

    return make_grader(JudgeSettings(url=reward_config.judge_url, model=reward_config.judge_model,
                                     mode=reward_config.judge_mode, concurrency=reward_config.judge_concurrency,
                                     timeout_s=reward_config.judge_timeout_s,
                                     max_retries=reward_config.judge_max_retries), run)


def grade_answers(run: Path, set_name: str, label: str, prompts: list[dict], answers: StageData, grader,
                  resamples: int) -> dict:
    """verdicts-<judge>/ (one row per answer and criterion) and summary-<judge>.json for one evaluated policy.

    `grader` is a judge.Judge or a rule_judge.RuleJudge: anything with name, identity(), describe(), grade(),
    stats and close(). Skipped answers are not graded."""
    by_id = {p["prompt_id"]: p for p in prompts}
    answered = answers.lazy().filter(~pl.col("finish_reason").str.starts_with("skipped")
                                     & pl.col("prompt_id").is_in(list(by_id))).collect().to_dicts()
    out_dir = layout.verdicts_dir(run, set_name, label, grader.name)
    inputs = {"answers": fingerprint(answers.manifest["shards"]), "judge": fingerprint(grader.identity())}
    with StageOutput(out_dir, EVAL_VERDICTS, inputs, ShardPlan(1)) as out:
        if out.todo():
            items = items_for(answered, by_id)
            click.echo(f"evaluate: grading {len(items)} answers, {sum(len(i.criteria) for i in items)} criteria, "
                       f"with {grader.describe()}")
            advance = TokenProgress(len(items), "answer")
            graded = grader.grade(items, on_progress=lambda n: advance(n, 0))
            advance.close()
            rows = [{"prompt_id": r["prompt_id"], "sample_idx": r["sample_idx"], "iteration": r["iteration"],
                     "criterion_idx": i, "criterion": c.text, "points": c.points, "met": v.met,
                     "explanation": v.explanation, "judge_model": grader.identity()["judge_model"]}
                    for r, item, verdicts in zip(answered, items, graded, strict=True)
                    for i, (c, v) in enumerate(zip(item.criteria, verdicts, strict=True))]
            out.write_shard(0, pa.Table.from_pylist(rows, schema=EVAL_VERDICTS.arrow))
            click.echo(grader.stats.line())
        out.finalize()
    grader.close()
    verdicts = read_stage(out_dir, EVAL_VERDICTS).lazy().collect()
    domains = {p["prompt_id"]: p["domain"] or "-" for p in prompts}
    # Satisfaction on the answers that ended on their own, beside all answers: a cut-off answer cannot end with
    # the summary a criterion asks for.
    finished = answers.lazy().filter(pl.col("finish_reason") == "stop").select("prompt_id", "sample_idx").collect()
    summary = {**grader.identity(), "judge": grader.describe(), **summarize(verdicts, domains, resamples),
               "finished": {**summarize(verdicts.join(finished, on=["prompt_id", "sample_idx"]), domains,
                                        resamples)["overall"], "answers": finished.height},
               "calls": dataclasses.asdict(grader.stats)}
    write_json_atomic(layout.summary_file(run, set_name, label, grader.name), summary)
    return summary
