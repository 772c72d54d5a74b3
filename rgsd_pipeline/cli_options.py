"""Command-line options declared once: the engine stages' (rollout, score), the judge's (evaluate), and the
placement overrides every command on a run takes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from rgsd_pipeline.engines import KINDS


def _use_placement(ctx, param, values):
    if values:
        from rgsd_pipeline.recipe import use_placement

        use_placement(list(values))
    return values


def engine_placement(engine_kind: str | None) -> dict:
    """What `--engine KIND` means as placement: that engine for sampling and for scoring."""
    return {"engine.kind": engine_kind, "engine.score_kind": ""} if engine_kind else {}


def _use_engine(ctx, param, value):
    if value:
        from rgsd_pipeline.recipe import use_placement

        use_placement(engine_placement(value))
    return value


def engine_option(help_text: str):
    """--engine KIND: engine.kind=KIND engine.score_kind= for this command (recorded as such in its outputs)."""
    return click.option("--engine", "engine_kind", type=click.Choice(KINDS), callback=_use_engine, help=help_text)


def placement_overrides(command):
    """The `section.key=value` arguments of a command on an existing run: placement overrides (engines, teacher
    servers, batch sizes that do not change results, trackers) applied on top of run.yaml for this command; a recipe
    key is refused (recipe.use_placement)."""
    return click.argument("placement", nargs=-1, callback=_use_placement, expose_value=False,
                          metavar="[PLACEMENT=VALUE]...")(command)


def engine_stage_options(command):
    """--run, --iteration, --engine, the --num-shards / --shard-index split of a stage across workers, and placement
    overrides."""
    options = [
        click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder."),
        click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration to work on."),
        engine_option("Override the config's engine (engine.kind=KIND engine.score_kind=)."),
        click.option("--num-shards", default=1, type=click.IntRange(min=1),
                     help="Independent workers splitting the stage."),
        click.option("--shard-index", default=0, type=click.IntRange(min=0),
                     help="This worker's index in [0, num-shards)."),
    ]
    for option in reversed(options):
        command = option(command)
    return placement_overrides(command)


def judge_options(command):
    """The LLM judge's --judge-* options, their defaults taken from judge.JudgeSettings; the command receives them
    as `judge_*` keyword arguments for judge_settings()."""
    from rgsd_pipeline.judge import MODES, STRUCTURED, JudgeSettings

    default = {f.name: f.default for f in dataclasses.fields(JudgeSettings)}
    options = [
        click.option("--judge", "judge_kind", type=click.Choice(["llm", "rules"]),
                     help="rules: grade the machine-checkable predicates in criterion tags (no model, any CPU); "
                          "llm: an LLM judge (given by --judge-url and --judge-model)."),
        click.option("--judge-url", help="OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8000/v1."),
        click.option("--judge-model", help="Model name the judge serves."),
        click.option("--judge-mode", default=default["mode"], type=click.Choice(MODES), show_default=True,
                     help="One call per answer with all criteria (as the paper), or one per criterion (HealthBench)."),
        click.option("--judge-concurrency", default=default["concurrency"], type=click.IntRange(min=1),
                     show_default=True, help="Judge calls in flight at once."),
        click.option("--judge-timeout", default=default["timeout_s"], type=click.FloatRange(min=1), show_default=True,
                     help="Seconds per judge call."),
        click.option("--judge-retries", default=default["max_retries"], type=click.IntRange(min=0), show_default=True,
                     help="Retries (with backoff) of a failed call."),
        click.option("--judge-structured", default=default["structured"], type=click.Choice(STRUCTURED),
                     show_default=True,
                     help="Send a JSON schema as response_format (auto: unless the server refuses it)."),
        click.option("--judge-max-tokens", default=default["max_tokens"], type=click.IntRange(min=16),
                     show_default=True, help="Token limit of a judge reply."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def judge_settings(judge_kind, judge_url, judge_model, judge_mode, judge_concurrency, judge_timeout, judge_retries,
                   judge_structured, judge_max_tokens):
    """"rules", JudgeSettings for an LLM judge, or None when no judge was asked for."""
    from rgsd_pipeline.judge import JudgeSettings

    if judge_kind == "rules":
        if judge_url or judge_model:
            raise click.UsageError("--judge rules takes no --judge-url or --judge-model")
        return "rules"
    if bool(judge_url) != bool(judge_model):
        raise click.UsageError("--judge-url and --judge-model go together")
    if not judge_url:
        if judge_kind == "llm":
            raise click.UsageError("--judge llm needs --judge-url and --judge-model")
        return None
    return JudgeSettings(url=judge_url, model=judge_model, mode=judge_mode, concurrency=judge_concurrency,
                         timeout_s=judge_timeout, max_retries=judge_retries, structured=judge_structured,
                         max_tokens=judge_max_tokens)
