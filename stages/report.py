"""Stage `report`: what an iteration changed, without a judge.

    rgsd-pipeline report --run runs/demo --iteration 0 [--heldout 12]

Samples the base model and iteration I's checkpoint on the same held-out prompts with the same seeds,
scores both with the rubric-conditioned teacher, and prints the teacher–student divergence before and
after, one answer before and after, and where every artifact is.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import click
import polars as pl

from rgsd_pipeline import layout
from rgsd_pipeline.config import load_run_config
from rgsd_pipeline.diagnostics import heldout_divergence
from rgsd_pipeline.engines.hosting import StageEngines
from rgsd_pipeline.models import resolve_model
from rgsd_pipeline.sampling import EVAL_SEED_ROUND, sample_seed
from rgsd_pipeline.shards import ArtifactError, read_stage
from schemas import PROMPTS, ROLLOUTS


def report(run: Path, iteration: int, heldout: int) -> None:
    # 1. Inputs: the held-out prompts, the base model (teacher and "before"), iteration I's checkpoint ("after").
    config = load_run_config(run)
    prompts = read_stage(layout.prompts_dir(run), PROMPTS).lazy().collect()
    held = prompts.filter(pl.col("split") == "heldout").head(heldout).to_dicts()
    if not held:
        raise ArtifactError(f"{layout.prompts_dir(run)} has no held-out prompts; set data.heldout_fraction > 0")
    base = resolve_model(config.model.path)
    checkpoint = layout.policy_path(run, iteration + 1, base)
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS).lazy()
    samples, tokens = rollouts.select(pl.len(), pl.col("response_token_ids").list.len().sum()).collect().row(0)
    train_prompts = prompts.filter(pl.col("split") == "train").height

    # 2. Both policies sample the same held-out prompts with the same seeds; the teacher scores both. Transformers
    #    engines, each prompt set one batch (decoding is step-bound on a CPU).
    one_batch = dataclasses.replace(config, engine=dataclasses.replace(config.engine, hf_batch_size=len(held)))
    engines = StageEngines("hf")
    teacher, trained = engines.teacher(base, one_batch), engines.student(checkpoint, one_batch)
    seeds = [sample_seed(config.rollout.seed, p["prompt_id"], 0, seed_round=EVAL_SEED_ROUND) for p in held]
    before = heldout_divergence(teacher, teacher, held, config, seeds, config.score.top_k, config.train.beta)
    after = heldout_divergence(trained, teacher, held, config, seeds, config.score.top_k, config.train.beta)

    # 3. The report.
    wrap = lambda text: textwrap.indent(textwrap.fill(text.strip()[:600] or "(empty)", 100), "    ")  # noqa: E731
    how = f"β={config.train.beta}, {len(held)} prompts, teacher top-{config.score.top_k} + tail"
    folder = layout.iteration_dir(run, iteration)
    click.echo(f"""
RGSD report — {run}, iteration {iteration}
  prompts            {train_prompts} train, {prompts.height - train_prompts} held out
  rollouts           {samples} samples, {tokens} response tokens
  held-out JSD       before {before.divergence:.4f} -> after {after.divergence:.4f} per token ({how})
  mean answer length before {before.mean_length:.1f} -> after {after.mean_length:.1f} tokens

  question: {held[0]['messages'][-1]['content']}
  before:
{wrap(before.answers[0])}
  after:
{wrap(after.answers[0])}

  artifacts          {layout.prompts_dir(run)}  {folder}/{{rollouts,signals,checkpoint,metrics.jsonl}}
  inspect            rgsd-pipeline inspect {run} --iteration {iteration} --html tokens.html --plot run.png
                     or in Python: from rgsd_pipeline import inspect; inspect.tokens("{run}", {iteration}).collect()
  evaluate           rgsd-pipeline evaluate --run {run} --iteration {iteration} [--judge rules | --judge-url URL ...]
""")


@click.command("report")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose checkpoint to compare.")
@click.option("--heldout", default=12, type=click.IntRange(min=1), help="Held-out prompts to sample.")
def command(run, iteration, heldout):
    """Held-out teacher–student divergence before and after an iteration, with a sample answer."""
    report(run, iteration, heldout)
