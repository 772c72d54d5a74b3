"""Command `inspect`: where the teacher and the student disagree, and how a run moves across iterations.

    rgsd-pipeline inspect runs/demo --iteration 0                      # top tokens + per-policy table
    rgsd-pipeline inspect runs/demo --iteration 0 --html tokens.html   # every token coloured by the gap
    rgsd-pipeline inspect runs/demo --plot run.png                     # log-prob gap, length, score per policy

The same frames are a Python API: `from rgsd_pipeline import inspect` (see rgsd_pipeline/inspect.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import polars as pl

from rgsd_pipeline import inspect as views
from rgsd_pipeline import layout
from rgsd_pipeline.shards import ArtifactError, is_complete, write_text_atomic


def disagreements(run: Path, iteration: int, top: int, context: int, alternatives: int = 3) -> str:
    """The `top` masked tokens with the largest log-prob gap, each with its context and the teacher's picks."""
    worst = (views.tokens(run, iteration).filter(pl.col("mask"))
             .sort("logprob_gap", descending=True, nulls_last=True).head(top).collect())
    if worst.is_empty():
        return f"iteration {iteration}: no scored tokens"
    keys = worst.select("prompt_id", "sample_idx").unique()
    responses = {(r["prompt_id"], r["sample_idx"]): r["response_token_ids"] for r in
                 views.rollouts_stage(run, iteration).lazy()
                 .select("prompt_id", "sample_idx", "response_token_ids")
                 .join(keys.lazy(), on=["prompt_id", "sample_idx"]).collect().iter_rows(named=True)}
    vocab = dict(views.vocabulary(run).iter_rows())
    text = lambda ids: "".join(vocab.get(i, "?") for i in ids).replace("\n", "↵")  # noqa: E731
    lines = [f"iteration {iteration}: the {worst.height} tokens the student was surest of and the teacher least "
             "(log-prob gap = log π_student − log π_teacher of the sampled token)"]
    for t in worst.iter_rows(named=True):
        ids = responses[(t["prompt_id"], t["sample_idx"])]
        pos = t["position"]
        picks = ", ".join(f"{vocab.get(i, '?')!r} {math.exp(lp):.0%}"
                          for i, lp in list(zip(t["teacher_topk_ids"], t["teacher_topk_logprobs"],
                                                strict=True))[:alternatives])
        before, token, after = ids[max(0, pos - context):pos], [t["token_id"]], ids[pos + 1:pos + 1 + context // 2]
        lines.append(f"  {t['prompt_id'][:10]}/{t['sample_idx']} @{pos:<4d} {t['logprob_gap']:+6.2f}  "
                     f"…{text(before)}⟦{text(token)}⟧{text(after)}…")
        passes = ("" if t["rubric_logprob"] is None else
                  f" (guided; rubric pass {t['rubric_logprob']:.2f}, negative pass {t['negative_logprob']:.2f})")
        lines.append(f"      student {t['policy_logprob']:.2f}, teacher {t['teacher_logprob']:.2f}{passes}; "
                     f"teacher prefers {picks}")
    return "\n".join(lines)


def write_html(run: Path, iteration: int, out: Path, rollouts: int) -> None:
    from rgsd_pipeline.token_page import render

    chosen = (views.rollouts(run, iteration).filter(pl.col("status") == "ok")
              .sort("logprob_gap_mean", descending=True, nulls_last=True).head(rollouts).collect())
    tokens = (views.tokens(run, iteration).join(chosen.lazy().select("prompt_id", "sample_idx"),
                                                on=["prompt_id", "sample_idx"]).collect())
    vocab = dict(views.vocabulary(run).iter_rows())
    page = render(f"{run} · iteration {iteration} · {chosen.height} rollouts, highest mean log-prob gap first",
                  tokens, chosen, vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)


@click.command("inspect")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--iteration", type=click.IntRange(min=0),
              help="Iteration whose tokens to show (default: the last scored).")
@click.option("--top", default=15, type=click.IntRange(min=0), help="How many disagreeing tokens to print.")
@click.option("--context", default=12, type=click.IntRange(min=0), help="Tokens of context before each.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the token page here.")
@click.option("--html-rollouts", default=40, type=click.IntRange(min=1), help="Rollouts on the page.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG across policies.")
@click.option("--eval-set", default="heldout", help="Evaluation set whose results the table and plot show.")
def command(run, iteration, top, context, html_out, html_rollouts, plot_out, eval_set):
    """Tokens where teacher and student disagree most, statistics per policy, an HTML page and a plot."""
    if not run.exists():
        raise ArtifactError(f"{run} does not exist")
    if not layout.run_config_file(run).exists():
        raise ArtifactError(f"{run} is not a run folder (no {layout.run_config_file(run).name}); pass the folder "
                            "that `prepare --run` or `iterate --run` made")
    if iteration is None:
        scored = [i for i in layout.iterations(run) if is_complete(layout.signals_dir(run, i))]
        iteration = scored[-1] if scored else None
    if iteration is not None and top:
        click.echo(disagreements(run, iteration, top, context))
    frame = views.iterations(run, eval_set)
    click.echo(f"\nper policy (policy I samples iteration I; iter-I is the checkpoint trained in iteration I):\n"
               f"{views.format_policies(frame)}")
    if html_out:
        if iteration is None:
            raise ArtifactError(f"{run} has no scored iteration to draw")
        write_html(run, iteration, html_out, html_rollouts)
        click.echo(f"token page: {html_out}")
    if plot_out:
        from rgsd_pipeline.plots import plot_iterations

        plot_iterations(frame, plot_out, f"{run}")
        click.echo(f"plot: {plot_out}")
