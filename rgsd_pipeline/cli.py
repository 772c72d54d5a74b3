"""The `rgsd-pipeline` command: a click group over the stage modules in stages/."""

from __future__ import annotations

import os
import sys

import click

from rgsd_pipeline import __version__

# Errors a user can fix from the message alone: printed without a traceback, exit status 2.
USER_ERRORS = ("ConfigError", "SourceError", "ArtifactError", "ModelError", "LockedError", "JudgeError")


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as err:
            if type(err).__name__ in USER_ERRORS and not os.environ.get("RGSD_TRACEBACK"):
                click.secho(f"error: {err}", fg="red", err=True)
                sys.exit(2)
            raise


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rgsd-pipeline")
def main():
    """Rubric-Guided Self-Distillation: prepare -> (rollout -> score -> train) per iteration.

    Every stage reads and writes Parquet shards under a run folder (--run), resumes after an
    interruption, and refuses inputs that differ from the ones it started with.
    """


@main.command("config-reference")
@click.option("--markdown", is_flag=True, help="The Markdown table of the README.")
def config_reference(markdown):
    """Print every config key with its default and meaning."""
    from rgsd_pipeline.config import reference, reference_markdown

    if markdown:
        click.echo(reference_markdown(), nl=False)
        return
    for key, default, help_text in reference():
        click.echo(f"{key:32s} {default:24s} {help_text}" if len(default) <= 24 else f"{key:32s} {help_text}\n{'':33s}default: {default}")


def _register():
    from stages import evaluate, inspect, iterate, prepare, report, rollout, score, train

    for stage in (prepare, rollout, score, train, iterate, report, evaluate, inspect):
        main.add_command(stage.command)


_register()
