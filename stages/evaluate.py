"""Stage `evaluate`: one policy answers an evaluation set; judge-free diagnostics; rubric scores from a judge.

    rgsd-pipeline evaluate --run runs/demo --iteration base                  # the base model, no judge
    rgsd-pipeline evaluate --run runs/proof --iteration 2 --judge rules      # checkable criteria, on a CPU
    rgsd-pipeline evaluate --run runs/demo --iteration 0 \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct
    rgsd-pipeline evaluate --run runs/demo --iteration 1 --data healthbench.jsonl --max-prompts 200 ...
    rgsd-pipeline evaluate --run runs/demo --iteration 0 --lm-eval rgsd_arithmetic     # capability: base vs iter-000

`--iteration I` evaluates iter-I/checkpoint (the policy trained in iteration I); `base` the base model.
The prompts are the run's held-out split, or every valid row of `--data` (bad rows are quarantined as in
`prepare`). Everything lands in eval/<set>/: prompts/, and per policy answers/ (shards, resumable),
diagnostics.json, verdicts-<judge>/ and summary-<judge>.json. Answers use the same seed per
(prompt, sample) for every policy, so iterations are compared on paired samples. `--judge rules` grades the
machine-checkable predicates some data sets carry (builtin:checkable) with no model. LLM-judge verdicts are
cached in eval/judge-cache.sqlite: a rerun over the same answers makes no judge calls. Each run ends
with a table of every policy evaluated on the set.

`--lm-eval TASKS` runs lm-evaluation-harness instead (rgsd_pipeline/capability.py): the tasks on the base model
and on the policy, both scores and their paired difference printed, results kept in eval/lm-eval/<policy>/.
`rgsd_arithmetic` is bundled and needs no download; any lm-eval task name works where its data can be had.
"""

from __future__ import annotations

from pathlib import Path

import click

from rgsd_pipeline import inspect as views
from rgsd_pipeline import layout, tracking
from rgsd_pipeline.cli_options import engine_option, judge_options, judge_settings, placement_overrides
from rgsd_pipeline.models import resolve_model
from rgsd_pipeline.recipe import load_run_config


def evaluate(run: Path, iteration: str, data_spec: str | None, set_name: str | None, max_prompts: int, samples: int,
             engine_kind: str | None, judge, with_divergence: bool, resamples: int,
             also_grade: str | None = None) -> None:
    from rgsd_pipeline.evaluation import set_name_for

    set_name = set_name or set_name_for(data_spec)
    result = evaluate_policy(run, iteration, data_spec, set_name, max_prompts, samples, engine_kind, judge,
                             with_divergence, resamples, also_grade=also_grade)
    if result.get("also") is not None:
        also = result["also"]["overall"]
        click.echo(f"on {also_grade}'s criteria for the same questions: {also['mean']:.3f} [{also['low']:.3f}, "
                   f"{also['high']:.3f}] ({also['n']} prompts)")
    # Every policy evaluated on this set, side by side.
    click.echo(f"eval set {set_name} ({layout.eval_set_dir(run, set_name)})")
    click.echo(views.format_policies(views.iterations(run, set_name), evaluated_only=True))


def evaluate_policy(run: Path, iteration: str, data_spec: str | None, set_name: str, max_prompts: int, samples: int,
                    engine_kind: str | None, judge, with_divergence: bool, resamples: int = 1000, engines=None,
                    also_grade: str | None = None) -> dict:
    """One policy on one evaluation set: {label, prompts, answers, diagnostics, summary (None without a judge), also
    (the same answers graded against `also_grade`'s criteria for the same questions, or None)}; every piece written
    under eval/<set>/ and reused when it is there. `report` calls this too, with `engines` that keep one engine for
    all its policies."""
    from rgsd_pipeline.diagnostics import write_diagnostics
    from rgsd_pipeline.evaluation import eval_prompts, evaluated_policy, generate_answers
    from rgsd_pipeline.grading import grade_answers, make_grader

    # 1. The policy, and the prompts of the evaluation set.
    config = load_run_config(run)
    base = resolve_model(config.model)
    label, policy = evaluated_policy(run, iteration, base)
    prompts = eval_prompts(run, config, data_spec, set_name, max_prompts)
    if judge == "rules":
        from rgsd_pipeline.rule_judge import check_gradable

        check_gradable(prompts, f"the evaluation set {set_name}")

    # 2. Its answers: the same seed per (prompt, sample) for every policy.
    answers = generate_answers(run, config, prompts, set_name, label, policy, samples, engine_kind, engines)

    # 3. Judge-free diagnostics: length, truncation, repetition, rubric leakage, teacher-policy JSD (none for the
    #    teacher itself, which would be measured against itself).
    diagnostics = write_diagnostics(layout.diagnostics_file(run, set_name, label), config, prompts,
                                    answers.lazy().collect(), policy, base,
                                    with_divergence and label != layout.TEACHER_LABEL)
    watched = {f"eval/{set_name}/{label}/{key}": diagnostics[key]
               for key in ("divergence", "mean_length", "truncation_rate", "repetition_rate", "leakage_rate")}

    # 4. Rubric scores, when a judge is given.
    summary = also = None
    if judge is not None:
        grader = make_grader(judge, run)
        summary = grade_answers(run, set_name, label, prompts, answers, grader, resamples)
        watched[f"eval/{set_name}/{label}/satisfaction_{grader.name}"] = summary["overall"]["mean"]
        if also_grade:  # the same answers against another data set's criteria for these questions
            from rgsd_pipeline.evaluation import also_graded_prompts, set_name_for
            from rgsd_pipeline.grading import OtherCriteria

            other = OtherCriteria(make_grader(judge, run), set_name_for(also_grade), also_grade)
            also = grade_answers(run, set_name, label, also_graded_prompts(run, config, prompts, also_grade), answers,
                                 other, resamples)
            watched[f"eval/{set_name}/{label}/satisfaction_{other.name}"] = also["overall"]["mean"]
    tracking.log_values(run, config, None, watched, tracking.policy_step(policy))
    return {"label": label, "prompts": prompts, "answers": answers, "diagnostics": diagnostics, "summary": summary,
            "also": also}


def evaluate_lm_eval(run: Path, iteration: str, tasks: list[str], limit: int | None) -> None:
    """lm-evaluation-harness on the base model and the policy `iteration` names, printed side by side."""
    from rgsd_pipeline.capability import comparison
    from rgsd_pipeline.capability import evaluate_policy as lm_evaluate
    from rgsd_pipeline.evaluation import evaluated_policy

    if iteration == layout.TEACHER_LABEL:
        raise click.UsageError("--lm-eval evaluates models, and the teacher is the base model (reading rubrics): "
                               "give --iteration base or an iteration number")
    config = load_run_config(run)
    base = resolve_model(config.model)
    label, policy = evaluated_policy(run, iteration, base)
    before = lm_evaluate(run, layout.BASE_LABEL, base, config, tasks, limit, click.echo)
    after = before if label == layout.BASE_LABEL else lm_evaluate(run, label, policy, config, tasks, limit, click.echo)
    click.echo(f"lm-eval ({', '.join(tasks)}{f', first {limit} items' if limit else ''}), results in "
               f"{layout.lm_eval_file(run, label).parent.parent}")
    click.echo(comparison(before, after, layout.BASE_LABEL, label))


def _iteration(value: str) -> str:
    if value in (layout.BASE_LABEL, layout.TEACHER_LABEL) or value.isdigit():
        return value
    raise click.BadParameter(f"{value!r} is neither 'base', 'teacher' nor an iteration number")


@click.command("evaluate")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iteration", required=True, callback=lambda ctx, p, v: _iteration(v),
              help="'base', I to evaluate iter-I/checkpoint, or 'teacher' (the base model reading the rubric).")
@click.option("--data", "data_spec",
              help="Evaluation data (any format `prepare` reads); default: the run's held-out split.")
@click.option("--name", "set_name",
              help="Name of the evaluation set folder under eval/ (default from --data, or 'heldout').")
@click.option("--max-prompts", default=0, type=click.IntRange(min=0), help="Evaluate at most N prompts (0: all).")
@click.option("--samples", default=1, type=click.IntRange(min=1), help="Answers per prompt.")
@engine_option("Override the config's engine for answers.")
@click.option("--divergence/--no-divergence", default=True, help="Teacher–policy JSD on the answers (HF engine).")
@click.option("--resamples", default=1000, type=click.IntRange(min=10), help="Bootstrap resamples for intervals.")
@click.option("--also-grade", "also_grade", metavar="DATA",
              help="Grade the same answers against this data set's criteria for the same questions too (e.g. "
                   "builtin:checkable for a run on builtin:howto): verdicts-<judge>-<name>/.")
@click.option("--lm-eval", "lm_eval_tasks", metavar="TASKS",
              help="Instead: lm-evaluation-harness tasks (comma-separated; rgsd_arithmetic is bundled) on the base "
                   "model and this policy.")
@click.option("--lm-eval-limit", type=click.IntRange(min=1), help="With --lm-eval: the first N items of each task.")
@judge_options
@placement_overrides
def command(run, iteration, data_spec, set_name, max_prompts, samples, engine_kind, divergence, resamples, also_grade,
            lm_eval_tasks, lm_eval_limit, **judge):
    """Answer held-out prompts with one policy; diagnostics, and rubric scores from a judge if one is given.

    The judge's API key is read from $RGSD_JUDGE_API_KEY (none needed for a local `vllm serve`).
    """
    if lm_eval_tasks:
        evaluate_lm_eval(run, iteration, [t.strip() for t in lm_eval_tasks.split(",") if t.strip()], lm_eval_limit)
        return
    settings = judge_settings(**judge)
    if also_grade and settings is None:
        raise click.UsageError("--also-grade grades with the judge: give --judge rules or an LLM judge")
    evaluate(run, iteration, data_spec, set_name, max_prompts, samples, engine_kind, settings, divergence, resamples,
             also_grade)
