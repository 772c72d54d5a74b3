"""Rubric scores from judge verdicts (HealthBench convention) with bootstrap intervals.

Score of one answer = points of the criteria it meets (negative criteria subtract) / the positive
points available. Criteria whose verdict could not be parsed are left out of both sums and counted;
an answer with no parsed positive criterion has no score. A prompt's score is the mean over its
answers; a mean over prompts is clipped to [0, 1], and its interval is a percentile bootstrap over
prompts.
"""

from __future__ import annotations

import numpy as np
import polars as pl


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


def interval(values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Clipped mean with a percentile bootstrap interval over the given per-prompt scores."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = np.clip(values[draws].mean(axis=1), 0.0, 1.0)
    tail = (1 - level) / 2 * 100
    return {"mean": clipped_mean(values), "low": float(np.percentile(means, tail)),
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
