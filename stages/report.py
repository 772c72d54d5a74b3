"""Stage `report`: what an iteration changed, measured on held-out prompts.

    rgsd-pipeline report --run runs/demo --iteration 0 [--heldout N]

The base model and iteration I's checkpoint answer the same held-out prompts with the same seeds, through
`evaluate` (the run's engine, answers and verdicts kept under eval/): the teacher–student divergence before and
after, and, when every criterion carries a machine-checkable predicate, rubric satisfaction by the rule judge of
the base model, the teacher itself (the base model reading the rubric) and the trained policy, with the paired
difference. Then one answer before and after, and where every artifact is.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import click
import polars as pl

from rgsd_pipeline import layout
from rgsd_pipeline.cli_options import placement_overrides
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import ArtifactError, read_stage
from schemas import PROMPTS, ROLLOUTS


def rules_can_grade(prompts: list[dict]) -> bool:
    """Whether the rule judge can grade every criterion of these prompts (each carries a predicate)."""
    from rgsd_pipeline.rule_judge import CHECK_TAG

    return all(any(t.startswith(CHECK_TAG) for t in c["tags"]) for p in prompts for c in p["rubric"])


def met_by_kind(verdicts: pl.DataFrame, kinds: pl.DataFrame) -> dict[str, float]:
    """Share of answers meeting each criterion kind."""
    rates = (verdicts.join(kinds, on=["prompt_id", "criterion_idx"]).filter(pl.col("met").is_not_null())
             .group_by("kind", maintain_order=True).agg(pl.col("met").mean()))
    return dict(rates.iter_rows())


def ci(value: dict, signed: bool = False) -> str:
    if value.get("mean") is None:
        return "–"
    form = "+.3f" if signed else ".3f"
    return f"{value['mean']:{form}} [{value['low']:{form}}, {value['high']:{form}}]"


def satisfaction_table(run: Path, set_name: str, results: dict[str, dict], judge: str = "rules",
                       summary_key: str = "summary") -> str:
    """The rule judge's satisfaction of each evaluated policy, the paired difference after - base, and per kind
    (`judge` and `summary_key` name another grading of the same answers: evaluate --also-grade)."""
    from rgsd_pipeline.grading import paired_difference
    from rgsd_pipeline.rule_judge import kind_of
    from schemas import EVAL_VERDICTS

    guidance = load_run_config(run).score
    names = {"base": "base model", "teacher": "teacher itself (base reading the rubric)" if not guidance.guidance else
             f"teacher itself (rubric-guided, g={guidance.guidance:g}, {guidance.guidance_negative} negative)"}
    rows = [("policy", "all answers [95% CI]", "finished answers [95% CI]")]
    for label, result in results.items():
        summary = result[summary_key]
        finished = summary["finished"]
        rows.append((names.get(label, f"after ({label})"), ci(summary["overall"]),
                     f"{ci(finished)} ({finished['answers']} of {summary['answers']})"))
    verdicts = {label: read_stage(layout.verdicts_dir(run, set_name, label, judge), EVAL_VERDICTS).lazy().collect()
                for label in results}
    # Each criterion's kind (its text where it has none), the same for every policy.
    criteria = pl.DataFrame([{"prompt_id": p["prompt_id"], "criterion_idx": i,
                              "kind": kind_of(c["tags"]) or c["criterion"]}
                             for p in (results["base"]["graded_prompts"] if summary_key != "summary" else
                                       results["base"]["prompts"]) for i, c in enumerate(p["rubric"])])
    trained = list(results)[-1]
    rows.append((f"{trained} - base, paired by prompt", ci(paired_difference(verdicts[trained], verdicts["base"]),
                                                           signed=True), ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)).rstrip() for row in rows]
    kinds = {label: met_by_kind(verdicts[label], criteria) for label in results}
    lines += ["", "share of answers meeting each kind of criterion: " + " / ".join(kinds)]
    lines += [f"  {kind:<16}" + " / ".join(f"{kinds[label].get(kind, float('nan')):.2f}" for label in kinds)
              for kind in kinds["base"]]
    return "\n".join("    " + line if line else "" for line in lines)


def report(run: Path, iteration: int, heldout: int, also_grade: str | None = None) -> None:
    from rgsd_pipeline.engines.hosting import ResidentEngines
    from stages.evaluate import evaluate_policy

    # 1. Inputs: the run's prompts and iteration I's rollouts.
    config = load_run_config(run)
    also_grade = config.data.also_grade if also_grade is None else also_grade
    prompts = read_stage(layout.prompts_dir(run), PROMPTS).lazy().collect()
    held = prompts.filter(pl.col("split") == "heldout").to_dicts()
    if not held:
        raise ArtifactError(f"{layout.prompts_dir(run)} has no held-out prompts; set data.heldout_fraction > 0")
    rollouts = read_stage(layout.rollouts_dir(run, iteration), ROLLOUTS).lazy()
    samples, tokens = rollouts.select(pl.len(), pl.col("response_token_ids").list.len().sum()).collect().row(0)
    train_prompts = prompts.filter(pl.col("split") == "train").height

    # 2. The base model, the teacher itself (when the rule judge can grade the rubric) and the trained policy answer
    #    the held-out prompts with the same seeds, through `evaluate`: its answers, diagnostics and verdicts.
    set_name = "heldout" if not heldout or heldout >= len(held) else f"heldout-sample-{heldout}"
    judge = "rules" if rules_can_grade(held) else None
    policies = ["base", *(["teacher"] if judge else []), str(iteration)]
    results = {}
    engines = ResidentEngines()  # one engine answers for all three: started once, the trained weights swapped in
    try:
        for policy in policies:
            result = evaluate_policy(run, policy, None, set_name, 0 if set_name == "heldout" else heldout, 1, None,
                                     judge, with_divergence=policy != "teacher", engines=engines,
                                     also_grade=also_grade if judge else None)
            results[result["label"]] = result
    finally:
        engines.close()
    before, after = results["base"], results[layout.policy_label(iteration + 1)]

    # 3. The report.
    def wrap(text: str) -> str:
        return textwrap.indent(textwrap.fill(text.strip()[:600] or "(empty)", 100), "    ")

    def answer(result: dict) -> str:
        return result["answers"].lazy().sort("prompt_id", "sample_idx").filter(
            pl.col("prompt_id") == first["prompt_id"]).collect()["response_text"][0]

    first = results["base"]["prompts"][0]
    n = len(results["base"]["prompts"])
    how = f"β={config.train.beta}, {n} prompts, teacher top-{config.score.top_k} + tail"
    jsd = lambda r: "–" if r["diagnostics"]["divergence"] is None else f"{r['diagnostics']['divergence']:.4f}"  # noqa: E731
    length = lambda r: f"{r['diagnostics']['mean_length']:.1f}"  # noqa: E731
    satisfaction = (f"\n  rubric satisfaction, rule judge, {n} held-out prompts (bench/agreement.py: its agreement "
                    f"with hand labels)\n{satisfaction_table(run, set_name, results)}\n" if judge else
                    "\n  rubric satisfaction: some criteria carry no machine-checkable predicate; grade with an LLM "
                    "judge (evaluate --judge-url ...)\n")
    if judge and also_grade:
        from rgsd_pipeline.evaluation import also_graded_prompts, set_name_for

        graded = also_graded_prompts(run, config, results["base"]["prompts"], also_grade)
        for result in results.values():
            result["graded_prompts"] = graded
        table = satisfaction_table(run, set_name, results, f"rules-{set_name_for(also_grade)}", "also")
        satisfaction += (f"\n  the same answers on {also_grade}'s criteria for the same {len(graded)} questions "
                         f"(never trained on)\n{table}\n")
    folder = layout.iteration_dir(run, iteration)
    click.echo(f"""
RGSD report — {run}, iteration {iteration}
  prompts            {train_prompts} train, {prompts.height - train_prompts} held out
  rollouts           {samples} samples, {tokens} response tokens
  held-out JSD       before {jsd(before)} -> after {jsd(after)} per token ({how})
  mean answer length before {length(before)} -> after {length(after)} tokens
{satisfaction}
  question: {first['messages'][-1]['content']}
  before:
{wrap(answer(before))}
  after:
{wrap(answer(after))}

  artifacts          {layout.prompts_dir(run)}  {folder}/{{rollouts,signals,checkpoint,metrics.jsonl}}
                     {layout.eval_set_dir(run, set_name)}/{{base,teacher,{after['label']}}}/{{answers,verdicts-rules}}
  inspect            rgsd-pipeline inspect {run} --iteration {iteration} --html tokens.html --plot run.png
                     or in Python: from rgsd_pipeline import inspect; inspect.tokens("{run}", {iteration}).collect()
  evaluate           rgsd-pipeline evaluate --run {run} --iteration {iteration} [--judge rules | --judge-url URL ...]
""")


@click.command("report")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose checkpoint to compare.")
@click.option("--heldout", default=0, type=click.IntRange(min=0),
              help="Held-out prompts to answer: a seeded sample of N (0: all).")
@click.option("--also-grade", "also_grade", metavar="DATA",
              help="Grade the same answers against this data set's criteria for the same questions too (e.g. "
                   "builtin:checkable for a run on builtin:howto); default: data.also_grade.")
@placement_overrides
def command(run, iteration, heldout, also_grade):
    """Held-out divergence and rubric satisfaction before and after an iteration, with a sample answer."""
    report(run, iteration, heldout, also_grade)
