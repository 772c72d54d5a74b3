"""Evaluation sets and the answers a policy gives to them (the judge appears only after this, in grading.py).

An evaluation set is the run's held-out split or the valid rows of a data file, written once to
eval/<set>/prompts/. A policy's answers are rollouts-schema shards in eval/<set>/<policy>/answers/, each
(prompt, sample) drawn with the same seed for every policy (sampling.EVAL_SEED_ROUND), so policies are
compared on paired samples.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import polars as pl
import pyarrow as pa

from rgsd_pipeline import layout
from rgsd_pipeline.config import RunConfig, to_dict
from rgsd_pipeline.engines.hosting import StageEngines
from rgsd_pipeline.fingerprints import fingerprint, model_fingerprint
from rgsd_pipeline.ingest import ingest
from rgsd_pipeline.models import load_tokenizer, resolve_model
from rgsd_pipeline.recipe import made_under
from rgsd_pipeline.render import student_messages, teacher_messages
from rgsd_pipeline.rows import split_draw
from rgsd_pipeline.sampling import EVAL_SEED_ROUND, sample_shards
from rgsd_pipeline.shards import (
    ArtifactError,
    ShardPlan,
    StageData,
    StageOutput,
    is_complete,
    read_stage,
    split_into_shards,
    write_jsonl_atomic,
)
from rgsd_pipeline.sources import source_fingerprint, source_label, source_path
from schemas import PROMPTS, ROLLOUTS

HELDOUT = "heldout"


def set_name_for(data_spec: str | None) -> str:
    """The folder name of an evaluation set: "heldout", or a name taken from the data spec."""
    if data_spec is None:
        return HELDOUT
    name = data_spec.split(":", 1)[1] if data_spec.startswith("builtin:") else Path(data_spec).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"


def evaluated_policy(run: Path, iteration: str, base: Path) -> tuple[str, Path]:
    """(label, model folder) of the policy `--iteration` names: "base", "teacher" (the base model reading the
    rubric: the ceiling RGSD distils from), or I for iteration I's checkpoint."""
    if iteration == layout.TEACHER_LABEL:
        return layout.TEACHER_LABEL, base
    policy = 0 if iteration == layout.BASE_LABEL else int(iteration) + 1
    if policy and not is_complete(layout.checkpoint_dir(run, policy - 1)):
        trained = [i for i in layout.iterations(run) if is_complete(layout.checkpoint_dir(run, i))]
        raise ArtifactError(f"--iteration {iteration}: {layout.checkpoint_dir(run, policy - 1)} is missing or "
                            f"incomplete (trained iterations: {', '.join(map(str, trained)) or 'none'}); evaluate one "
                            f"of those, base or teacher, or train it first (`rgsd-pipeline train --run {run} "
                            f"--iteration {iteration}`)")
    return layout.policy_label(policy), layout.policy_path(run, policy, base)


def eval_prompts(run: Path, config: RunConfig, data_spec: str | None, set_name: str, max_prompts: int) -> list[dict]:
    """The prompts of an evaluation set, written once to eval/<set>/prompts/ and read from there after."""
    out_dir = layout.eval_prompts_dir(run, set_name)
    if data_spec is None:
        run_prompts = read_stage(layout.prompts_dir(run), PROMPTS)
        inputs = {"prompts": fingerprint(run_prompts.manifest["shards"]), "max_prompts": str(max_prompts)}
        if max_prompts:  # a seeded sample since this release, no longer the first N
            inputs["sample_seed"] = str(config.data.split_seed + 2)
    else:
        inputs = {f"source:{source_label(data_spec)}": source_fingerprint(data_spec), "max_prompts": str(max_prompts),
                  "template": fingerprint(to_dict(config.template))}
    with StageOutput(out_dir, PROMPTS, inputs, ShardPlan(1)) as out:
        if out.todo():
            rows = _heldout_rows(run, run_prompts, max_prompts, config.data.split_seed + 2) if data_spec is None else \
                _data_rows(run, config, data_spec, set_name, max_prompts)
            out.write_shard(0, pa.Table.from_pylist(rows, schema=PROMPTS.arrow))
        out.finalize()
    return read_stage(out_dir, PROMPTS).lazy().collect().to_dicts()


def _heldout_rows(run: Path, run_prompts: StageData, max_prompts: int, seed: int = 0) -> list[dict]:
    """The held-out prompts in source order; with `max_prompts`, a seeded sample of that many (the first N in source
    order would all come from the first file, or the first domain, of the sources)."""
    rows = run_prompts.lazy().filter(pl.col("split") == "heldout").collect().to_dicts()
    if max_prompts and max_prompts < len(rows):
        chosen = set(sorted(range(len(rows)), key=lambda i: split_draw(rows[i]["prompt_id"], seed))[:max_prompts])
        rows = [row for i, row in enumerate(rows) if i in chosen]
    if not rows:
        raise ArtifactError(f"{layout.prompts_dir(run)} has no held-out prompts; set data.heldout_fraction > 0 at "
                            "prepare, or pass --data")
    return rows


def _data_rows(run: Path, config: RunConfig, data_spec: str, set_name: str, max_prompts: int) -> list[dict]:
    """Every valid row of a data file, read as `prepare` reads it; bad rows go to eval/<set>/quarantine.jsonl."""
    source_path(data_spec)  # a missing file is named before anything else happens
    data = dataclasses.replace(config.data, sources=[data_spec], heldout_fraction=0.0, max_prompts=max_prompts)
    tokenizer = load_tokenizer(resolve_model(config.model), config.model.trust_remote_code)
    result = ingest(data, config.template, tokenizer)
    click.echo(result.summary())
    if result.quarantine:
        write_jsonl_atomic(layout.eval_quarantine_file(run, set_name), result.quarantine)
        click.echo(f"rejected rows of {data_spec}: {layout.eval_quarantine_file(run, set_name)}")
    if not result.prompts:
        raise ArtifactError(f"no valid prompts in {data_spec}")
    trained = read_stage(layout.prompts_dir(run), PROMPTS).lazy().filter(pl.col("split") == "train")
    overlap = {r["prompt_id"] for r in result.prompts} & set(trained.select("prompt_id").collect()["prompt_id"])
    if overlap:
        click.secho(f"warning: {len(overlap)} of the {len(result.prompts)} prompts of {data_spec} are training "
                    "prompts of this run", fg="yellow", err=True)
    return result.prompts


def also_graded_prompts(run: Path, config: RunConfig, prompts: list[dict], data_spec: str) -> list[dict]:
    """The evaluation prompts with the criteria another data set gives their questions (matched by the question's
    messages: rows.question_id), keyed by the evaluation prompts' ids, for grading the same answers against them
    (`evaluate --also-grade`, `report`); prompts whose question the data set lacks are left out (warned)."""
    from rgsd_pipeline.rows import question_id

    source_path(data_spec)  # a missing file is named before anything else happens
    data = dataclasses.replace(config.data, sources=[data_spec], heldout_fraction=0.0, max_prompts=0)
    tokenizer = load_tokenizer(resolve_model(config.model), config.model.trust_remote_code)
    other = {question_id(p["messages"]): p for p in ingest(data, config.template, tokenizer).prompts}
    matched = [{**other[question_id(p["messages"])], "prompt_id": p["prompt_id"], "domain": p["domain"]}
               for p in prompts if question_id(p["messages"]) in other]
    if not matched:
        raise ArtifactError(f"--also-grade {data_spec}: none of the {len(prompts)} evaluated questions is in it; it "
                            "grades the same questions against other criteria")
    if len(matched) < len(prompts):
        click.secho(f"warning: {len(prompts) - len(matched)} of the {len(prompts)} evaluated questions are not in "
                    f"{data_spec}; they are left out of its scores", fg="yellow", err=True)
    return matched


def generate_answers(run: Path, config: RunConfig, prompts: list[dict], set_name: str, label: str, policy: Path,
                     samples: int, engine_kind: str | None, engines=None) -> StageData:
    """eval/<set>/<policy>/answers/: `samples` answers per prompt, seeded per (prompt, sample) alone. `engines`, when
    given, hosts the engine across several policies (engines.hosting.ResidentEngines: one start, weights swapped in
    place); the caller closes it."""
    work = [(p, s) for p in prompts for s in range(samples)]
    pieces = split_into_shards(work, config.data.rows_per_shard)
    inputs = {"prompts": fingerprint([p["prompt_id"] for p in prompts]), "policy": model_fingerprint(policy),
              "config": fingerprint({"rollout": to_dict(config.rollout), "template": to_dict(config.template),
                                     "max_model_len": config.model.max_model_len, "samples": samples})}
    out_dir = layout.answers_dir(run, set_name, label)
    reads_rubric = label == layout.TEACHER_LABEL
    guided = reads_rubric and config.score.guidance > 0  # the teacher the signals hold: sampled guided
    if reads_rubric:
        inputs["view"] = fingerprint(to_dict(config.template))
    if guided:
        inputs["guidance"] = fingerprint({"scale": config.score.guidance, "negative": config.score.guidance_negative})
    with StageOutput(out_dir, ROLLOUTS, inputs, ShardPlan(len(pieces)), made_under(config)) as out:
        shards = {i: pieces[i] for i in out.todo()}
        if shards:
            # Sampling the guided distribution needs both passes' full logits at every step: the transformers engine.
            hosts = StageEngines("hf") if guided else (engines or StageEngines(engine_kind))
            engine = hosts.student(policy, config)
            click.echo(f"evaluate: {len(work)} answers with {engine.kind} from {policy}"
                       + (" reading the rubric (the teacher itself)" if reads_rubric else "")
                       + (f", guided at {config.score.guidance:g} against the {config.score.guidance_negative} "
                          "negative" if guided else ""))
            tokenizer = load_tokenizer(policy, config.model.trust_remote_code)
            negative_view = None
            if guided:
                from rgsd_pipeline.guidance import negative_messages, other_rubrics

                train = read_stage(layout.prompts_dir(run), PROMPTS).lazy().filter(pl.col("split") == "train")
                others = other_rubrics(prompts, config.data.split_seed, train.collect().to_dicts())
                negative_view = lambda p: negative_messages(p, config.template,  # noqa: E731
                                                            config.score.guidance_negative, others)
            sample_shards(out, shards, engine, tokenizer, config, EVAL_SEED_ROUND, seed_round=EVAL_SEED_ROUND,
                          unit="answer", view=teacher_messages if reads_rubric else student_messages,
                          negative_view=negative_view)
            if engines is None or guided:
                engine.close()
        out.finalize()
    return read_stage(out_dir, ROLLOUTS)
