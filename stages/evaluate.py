"""Stage `evaluate`: answers from one policy on held-out prompts, judge-free diagnostics, and (optionally)
rubric scores from an LLM judge.

    rgsd-pipeline evaluate --run runs/demo --iteration base                  # the base model, no judge
    rgsd-pipeline evaluate --run runs/demo --iteration 0 \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct
    rgsd-pipeline evaluate --run runs/demo --iteration 1 --data healthbench.jsonl --max-prompts 200 ...

`--iteration I` evaluates iter-I/checkpoint (the policy trained in iteration I); `base` the base model.
The prompts are the run's held-out split, or every valid row of `--data` (bad rows are quarantined as in
`prepare`). Everything lands in eval/<set>/: prompts/, and per policy answers/ (shards, resumable),
diagnostics.json, verdicts-<judge>/ and summary-<judge>.json. Answers use the same seed per
(prompt, sample) for every policy, so iterations are compared on paired samples. Verdicts are cached in
eval/judge-cache.sqlite: a rerun over the same answers makes no judge calls. Each run ends with a table
comparing every policy evaluated on the set.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import click
import numpy as np
import polars as pl
import pyarrow as pa

from rgsd_pipeline import layout
from rgsd_pipeline.config import fingerprint, load_run_config, to_dict
from rgsd_pipeline.diagnostics import divergence, repetition_rate, rubric_leakage
from rgsd_pipeline.engines import KINDS, Sampling, make_engine
from rgsd_pipeline.grading import summarize
from rgsd_pipeline.ingest import ingest
from rgsd_pipeline.judge import MODES, STRUCTURED, Criterion, Item, Judge, JudgeSettings, VerdictCache
from rgsd_pipeline.models import load_tokenizer, model_fingerprint, resolve_model
from rgsd_pipeline.progress import TokenProgress
from rgsd_pipeline.sampling import EVAL_SEED_ROUND, sample_shards
from rgsd_pipeline.shards import (
    ArtifactError,
    ShardPlan,
    StageData,
    StageOutput,
    read_stage,
    write_json_atomic,
)
from rgsd_pipeline.sources import source_fingerprint, source_path
from schemas import EVAL_VERDICTS, PROMPTS, ROLLOUTS

BASE = "base"


def policy_for(run: Path, iteration: str, base: Path) -> tuple[str, int, Path]:
    """(label, iteration number or -1, model folder) of the policy named by --iteration."""
    if iteration == BASE:
        return BASE, -1, base
    number = int(iteration)
    return f"iter-{number:03d}", number, layout.policy_path(run, number + 1, base)


def set_name_for(data_spec: str | None) -> str:
    if data_spec is None:
        return "heldout"
    name = data_spec.split(":", 1)[1] if data_spec.startswith("builtin:") else Path(data_spec).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"


def eval_prompts(run: Path, config, data_spec: str | None, set_name: str, max_prompts: int) -> list[dict]:
    """The prompts of an evaluation set, written once to eval/<set>/prompts/ and read from there after."""
    out_dir = layout.eval_set_dir(run, set_name) / "prompts"
    if data_spec is None:
        run_prompts = read_stage(layout.prompts_dir(run), PROMPTS)
        inputs = {"prompts": fingerprint(run_prompts.manifest["shards"]), "max_prompts": str(max_prompts)}
    else:
        inputs = {f"source:{data_spec}": source_fingerprint(data_spec), "max_prompts": str(max_prompts),
                  "template": fingerprint(to_dict(config.template))}
    with StageOutput(out_dir, PROMPTS, inputs, ShardPlan(1)) as out:
        if out.todo():
            if data_spec is None:
                rows = run_prompts.lazy().filter(pl.col("split") == "heldout").collect().to_dicts()
                rows = rows[:max_prompts] if max_prompts else rows
                if not rows:
                    raise ArtifactError(f"{layout.prompts_dir(run)} has no held-out prompts; set "
                                        "data.heldout_fraction > 0 at prepare, or pass --data")
            else:
                source_path(data_spec)  # a missing file is named before anything else happens
                data = dataclasses.replace(config.data, sources=[data_spec], heldout_fraction=0.0,
                                           max_prompts=max_prompts)
                tokenizer = load_tokenizer(resolve_model(config.model.path), config.model.trust_remote_code)
                result = ingest(data, config.template, tokenizer)
                click.echo(result.summary())
                if result.quarantine:
                    quarantine = layout.eval_set_dir(run, set_name) / "quarantine.jsonl"
                    quarantine.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in result.quarantine))
                    click.echo(f"rejected rows of {data_spec}: {quarantine}")
                rows = result.prompts
                if not rows:
                    raise ArtifactError(f"no valid prompts in {data_spec}")
                trained = read_stage(layout.prompts_dir(run), PROMPTS).lazy().filter(pl.col("split") == "train")
                overlap = len({r["prompt_id"] for r in rows} & set(trained.select("prompt_id").collect()["prompt_id"]))
                if overlap:
                    click.secho(f"warning: {overlap} of the {len(rows)} prompts of {data_spec} are training "
                                "prompts of this run", fg="yellow", err=True)
            out.write_shard(0, pa.Table.from_pylist(rows, schema=PROMPTS.arrow))
        out.finalize()
    return read_stage(out_dir, PROMPTS).lazy().collect().to_dicts()


def generate_answers(config, prompts, folder: Path, policy: Path, iteration: int, samples: int,
                     engine_kind: str | None) -> StageData:
    """eval/<set>/<policy>/answers/: `samples` answers per prompt, seeded per (prompt, sample) alone."""
    work = [(p, s) for p in prompts for s in range(samples)]
    per_shard = config.data.rows_per_shard
    inputs = {"prompts": fingerprint([p["prompt_id"] for p in prompts]), "policy": model_fingerprint(policy),
              "config": fingerprint({"rollout": to_dict(config.rollout), "template": to_dict(config.template),
                                     "max_model_len": config.model.max_model_len, "samples": samples})}
    out_dir = folder / "answers"
    with StageOutput(out_dir, ROLLOUTS, inputs, ShardPlan(max(1, -(-len(work) // per_shard)))) as out:
        shards = {i: work[i * per_shard:(i + 1) * per_shard] for i in out.todo()}
        if shards:
            engine = make_engine(engine_kind or config.engine.kind, policy, config.engine, config.model,
                                 sampling=Sampling.of(config.rollout))
            click.echo(f"evaluate: {len(work)} answers with {engine.kind} from {policy}")
            tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
            sample_shards(out, shards, engine, tokenizer, config, iteration, seed_round=EVAL_SEED_ROUND, unit="answer")
            engine.close()
        out.finalize()
    return read_stage(out_dir, ROLLOUTS)


def diagnose(config, prompts: list[dict], answers: pl.DataFrame, folder: Path, policy: Path, base: Path,
             with_divergence: bool) -> dict:
    """diagnostics.json: length, truncation, repetition, rubric leakage and (optionally) held-out JSD."""
    path = folder / "diagnostics.json"
    answered = answers.filter(~pl.col("finish_reason").str.starts_with("skipped"))
    key = fingerprint({"answers": fingerprint(answered.select("prompt_id", "sample_idx", "response_token_ids").rows()),
                       "divergence": with_divergence, "beta": config.train.beta, "top_k": config.score.top_k})
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("inputs") == key:
            return previous
    by_id = {p["prompt_id"]: p for p in prompts}
    rows = answered.to_dicts()
    leaks = [rubric_leakage(r["response_text"], " ".join(m["content"] for m in by_id[r["prompt_id"]]["messages"]),
                            [c["criterion"] for c in by_id[r["prompt_id"]]["rubric"]]) for r in rows]
    result = {
        "inputs": key, "answers": len(rows), "skipped": answers.height - answered.height,
        "mean_length": float(np.mean([len(r["response_token_ids"]) for r in rows])) if rows else None,
        "truncation_rate": float(np.mean([r["finish_reason"] == "length" for r in rows])) if rows else None,
        "repetition_rate": float(np.mean([repetition_rate(r["response_token_ids"]) for r in rows])) if rows else None,
        "leakage_rate": float(np.mean([bool(x["leaked_ngrams"]) for x in leaks])) if rows else None,
        "rubric_word_rate": float(np.mean([bool(x["rubric_words"]) for x in leaks])) if rows else None,
        "leak_examples": [{"prompt_id": r["prompt_id"], **x} for r, x in zip(rows, leaks)
                          if x["leaked_ngrams"] or x["rubric_words"]][:5],
        "divergence": None, "divergence_tokens": 0,
    }
    if with_divergence and rows:
        from rgsd_pipeline.engines.hf_engine import HfEngine

        click.echo("evaluate: teacher–policy divergence on the answers (HF engine)")
        teacher = HfEngine(base, config.engine, config.model)
        student = teacher if policy == base else HfEngine(policy, config.engine, config.model)
        per_token = divergence(student, teacher, [by_id[r["prompt_id"]] for r in rows],
                               [r["response_token_ids"] for r in rows], config, config.score.top_k, config.train.beta)
        result["divergence"] = float(per_token.mean()) if len(per_token) else None
        result["divergence_tokens"] = int(len(per_token))
    write_json_atomic(path, result)
    return result


def judge_answers(run: Path, prompts: list[dict], answers_stage: StageData, answers: pl.DataFrame, folder: Path,
                  settings: JudgeSettings, resamples: int) -> dict:
    """verdicts-<judge>/ (one row per answer and criterion) and summary-<judge>.json."""
    by_id = {p["prompt_id"]: p for p in prompts}
    answered = answers.filter(~pl.col("finish_reason").str.starts_with("skipped")).to_dicts()
    out_dir = folder / f"verdicts-{settings.slug()}"
    inputs = {"answers": fingerprint(answers_stage.manifest["shards"]),
              "judge": fingerprint({"model": settings.model, "mode": settings.mode})}
    cache = VerdictCache(layout.judge_cache(run))
    judge = Judge(settings, cache)
    with StageOutput(out_dir, EVAL_VERDICTS, inputs, ShardPlan(1)) as out:
        if out.todo():
            items = [Item(prompt_id=r["prompt_id"], messages=tuple(by_id[r["prompt_id"]]["messages"]),
                          answer=r["response_text"],
                          criteria=tuple(Criterion(c["criterion"], float(c["points"]))
                                         for c in by_id[r["prompt_id"]]["rubric"])) for r in answered]
            click.echo(f"evaluate: grading {len(items)} answers, {sum(len(i.criteria) for i in items)} criteria, "
                       f"with {settings.model} at {settings.url} ({settings.mode})")
            advance = TokenProgress(len(items), "answer")
            graded = judge.grade(items, on_progress=lambda n: advance(n, 0))
            advance.close()
            rows = [{"prompt_id": r["prompt_id"], "sample_idx": r["sample_idx"], "iteration": r["iteration"],
                     "criterion_idx": i, "criterion": c.text, "points": c.points, "met": v.met,
                     "explanation": v.explanation, "judge_model": settings.model}
                    for r, item, verdicts in zip(answered, items, graded)
                    for i, (c, v) in enumerate(zip(item.criteria, verdicts))]
            out.write_shard(0, pa.Table.from_pylist(rows, schema=EVAL_VERDICTS.arrow))
            click.echo(judge.stats.line())
        out.finalize()
    cache.close()
    verdicts = read_stage(out_dir, EVAL_VERDICTS).lazy().collect()
    summary = {"judge_model": settings.model, "judge_mode": settings.mode, "judge_url": settings.url,
               **summarize(verdicts, {p["prompt_id"]: p["domain"] or "-" for p in prompts}, resamples),
               "calls": dataclasses.asdict(judge.stats)}
    write_json_atomic(folder / f"summary-{settings.slug()}.json", summary)
    return summary


def _order(label: str) -> tuple:
    return (0, -1) if label == BASE else (1, int(label.split("-")[1]))


def comparison_table(run: Path, set_name: str) -> str:
    """Every policy evaluated on the set: judge scores (if any) and the judge-free diagnostics."""
    root = layout.eval_set_dir(run, set_name)
    labels = sorted((p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"base|iter-\d+", p.name)), key=_order)
    judges = sorted({p.name[len("summary-"):-len(".json")] for p in root.glob("*/summary-*.json")})
    fmt = lambda v, spec=".4f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"eval set {set_name} ({root})"]
    header = f"  {'policy':9s} {'JSD':>7s} {'length':>7s} {'trunc':>6s} {'repeat':>6s} {'leak':>6s} {'rubric':>6s}"
    lines.append(header)
    for label in labels:
        d = json.loads((root / label / "diagnostics.json").read_text()) if (root / label / "diagnostics.json").exists() else {}
        lines.append(f"  {label:9s} {fmt(d.get('divergence')):>7s} {fmt(d.get('mean_length'), '.1f'):>7s} "
                     f"{fmt(d.get('truncation_rate'), '.2f'):>6s} {fmt(d.get('repetition_rate'), '.2f'):>6s} "
                     f"{fmt(d.get('leakage_rate'), '.2f'):>6s} {fmt(d.get('rubric_word_rate'), '.2f'):>6s}")
    for slug in judges:
        summaries = {label: json.loads((root / label / f"summary-{slug}.json").read_text())
                     for label in labels if (root / label / f"summary-{slug}.json").exists()}
        domains = sorted({d for s in summaries.values() for d in s["domains"]})
        lines.append(f"  judge {slug}: rubric score (clipped mean, 95% bootstrap interval over prompts)")
        lines.append(f"  {'policy':9s} {'score':>6s} {'interval':>15s} " + " ".join(f"{d[:10]:>10s}" for d in domains)
                     + f" {'unparsed':>8s}")
        for label, s in summaries.items():
            o = s["overall"]
            lines.append(f"  {label:9s} {fmt(o['mean'], '.3f'):>6s} {'[' + fmt(o['low'], '.3f') + ', ' + fmt(o['high'], '.3f') + ']':>15s} "
                         + " ".join(f"{fmt(s['domains'].get(d, {}).get('mean'), '.3f'):>10s}" for d in domains)
                         + f" {s['unparseable']:>4d}/{s['criteria']}")
    return "\n".join(lines)


def evaluate(run: Path, iteration: str, data_spec: str | None, set_name: str | None, max_prompts: int, samples: int,
             engine_kind: str | None, settings: JudgeSettings | None, with_divergence: bool, resamples: int) -> None:
    config = load_run_config(run)
    base = resolve_model(config.model.path)
    label, number, policy = policy_for(run, iteration, base)
    set_name = set_name or set_name_for(data_spec)
    prompts = eval_prompts(run, config, data_spec, set_name, max_prompts)
    folder = layout.eval_dir(run, set_name, label)
    answers_stage = generate_answers(config, prompts, folder, policy, number, samples, engine_kind)
    answers = answers_stage.lazy().collect()
    diagnose(config, prompts, answers, folder, policy, base, with_divergence)
    if settings is not None:
        judge_answers(run, prompts, answers_stage, answers, folder, settings, resamples)
    click.echo(comparison_table(run, set_name))


def _iteration(value: str) -> str:
    if value == BASE or value.isdigit():
        return value
    raise click.BadParameter(f"{value!r} is neither 'base' nor an iteration number")


@click.command("evaluate")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iteration", required=True, callback=lambda ctx, p, v: _iteration(v),
              help="'base', or I to evaluate iter-I/checkpoint.")
@click.option("--data", "data_spec", help="Evaluation data (any format `prepare` reads); default: the run's held-out split.")
@click.option("--name", "set_name", help="Name of the evaluation set folder under eval/ (default from --data, or 'heldout').")
@click.option("--max-prompts", default=0, type=click.IntRange(min=0), help="Evaluate at most N prompts (0: all).")
@click.option("--samples", default=1, type=click.IntRange(min=1), help="Answers per prompt.")
@click.option("--engine", "engine_kind", type=click.Choice(KINDS), help="Override the config's engine for answers.")
@click.option("--divergence/--no-divergence", default=True, help="Teacher–policy JSD on the answers (HF engine).")
@click.option("--judge-url", help="OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8000/v1.")
@click.option("--judge-model", help="Model name the judge serves.")
@click.option("--judge-mode", default="per-answer", type=click.Choice(MODES),
              help="One call per answer with all criteria (as the paper), or one per criterion (HealthBench).")
@click.option("--judge-concurrency", default=8, type=click.IntRange(min=1), help="Judge calls in flight at once.")
@click.option("--judge-timeout", default=120.0, type=click.FloatRange(min=1), help="Seconds per judge call.")
@click.option("--judge-retries", default=4, type=click.IntRange(min=0), help="Retries (with backoff) of a failed call.")
@click.option("--judge-structured", default="auto", type=click.Choice(STRUCTURED),
              help="Send a JSON schema as response_format (auto: unless the server refuses it).")
@click.option("--judge-max-tokens", default=1024, type=click.IntRange(min=16), help="Token limit of a judge reply.")
@click.option("--resamples", default=1000, type=click.IntRange(min=10), help="Bootstrap resamples for intervals.")
def command(run, iteration, data_spec, set_name, max_prompts, samples, engine_kind, divergence, judge_url, judge_model,
            judge_mode, judge_concurrency, judge_timeout, judge_retries, judge_structured, judge_max_tokens, resamples):
    """Answer held-out prompts with one policy; diagnostics, and rubric scores from a judge if one is given.

    The judge's API key is read from $RGSD_JUDGE_API_KEY (none needed for a local `vllm serve`).
    """
    if bool(judge_url) != bool(judge_model):
        raise click.UsageError("--judge-url and --judge-model go together")
    settings = JudgeSettings(url=judge_url, model=judge_model, mode=judge_mode, concurrency=judge_concurrency,
                             timeout_s=judge_timeout, max_retries=judge_retries, structured=judge_structured,
                             max_tokens=judge_max_tokens) if judge_url else None
    evaluate(run, iteration, data_spec, set_name, max_prompts, samples, engine_kind, settings, divergence, resamples)
