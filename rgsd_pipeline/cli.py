"""The `rgsd-pipeline` command: a click group over the stage modules in stages/.

A stage module is imported only when its command runs (torch, transformers and vLLM take seconds to
import); `rgsd-pipeline --help` lists the commands with the first line of each command's docstring, read
from the module's source. Third-party warnings, log lines and progress bars are silenced unless
`-v/--verbose` is given; the setting travels to child processes through the environment.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from rgsd_pipeline import __version__
from rgsd_pipeline.allocator import keep_freed_memory
from rgsd_pipeline.errors import UserError

# Command name -> the module whose `command` it is, in the order `--help` lists them.
STAGES = {name: f"stages.{name.replace('-', '_')}" for name in
          ("prepare", "rollout", "score", "reward", "train", "iterate", "report", "evaluate", "inspect", "export",
           "serve-teacher")}
VERBOSE_ENV = "RGSD_VERBOSE"


def quiet_third_party() -> None:
    """Silence other libraries' warnings, INFO logs and progress bars, here and in child processes."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # children, vLLM's engine core among them
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore")
    # torch resets its own top logger when imported; the module that warns about a missing Triton it leaves alone.
    for name in ("torch._library.triton", "vllm", "transformers", "datasets", "lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _short_help(module: str) -> str:
    """The first line of `command`'s docstring in a stage module, read from its source without importing it."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "command":
            return (ast.get_docstring(node) or "").split("\n")[0]
    return ""


class Group(click.Group):
    """The command group: stages imported on use; a UserError printed as one line with exit status 2."""

    def list_commands(self, ctx):
        return [*super().list_commands(ctx), *STAGES]

    def get_command(self, ctx, name):
        if name in STAGES:
            return importlib.import_module(STAGES[name]).command
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(name, self.commands[name].get_short_help_str()) for name in super().list_commands(ctx)]
        rows += [(name, _short_help(module)) for name, module in STAGES.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            if os.environ.get("RGSD_TRACEBACK"):
                raise
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rgsd-pipeline")
@click.option("-v", "--verbose", is_flag=True, help="Show other libraries' warnings, logs and progress bars.")
def main(verbose):
    """Rubric-Guided Self-Distillation: prepare -> (rollout -> score -> train) per iteration.

    Every stage reads and writes Parquet shards under a run folder (--run), resumes after an
    interruption, and refuses inputs that differ from the ones it started with.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if not os.environ.get(VERBOSE_ENV):
        quiet_third_party()
    keep_freed_memory()


if not os.environ.get(VERBOSE_ENV):
    # vLLM's engine process (started with spawn) imports this module again before torch: quiet it there too.
    quiet_third_party()


@main.command("config-reference")
@click.option("--markdown", is_flag=True, help="The Markdown table of the README.")
def config_reference(markdown):
    """Print every config key with its default and meaning."""
    from rgsd_pipeline.config import reference, reference_markdown

    if markdown:
        click.echo(reference_markdown(), nl=False)
        return
    for key, default, help_text in reference():
        if len(default) <= 24:
            click.echo(f"{key:32s} {default:24s} {help_text}")
        else:
            click.echo(f"{key:32s} {help_text}\n{'':33s}default: {default}")


@main.command("plan")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML recipe.")
@click.option("--nodes", default=1, type=click.IntRange(min=1), show_default=True, help="Machines.")
@click.option("--gpus-per-node", default=8, type=click.IntRange(min=1), show_default=True, help="GPUs per machine.")
@click.option("--gpu-memory-gib", default=80.0, type=click.FloatRange(min=1), show_default=True,
              help="Memory of one GPU.")
@click.option("--disk-gbps", default=1.0, type=click.FloatRange(min=0.001), show_default=True,
              help="Write bandwidth of the run folder's file system, GB/s.")
@click.argument("overrides", nargs=-1)
def plan(config_path, nodes, gpus_per_node, gpu_memory_gib, disk_gbps, overrides):
    """Memory per GPU of a resident iterate, refused when it does not fit; what an iteration writes and how long
    that and the iteration take (an estimate)."""
    from rgsd_pipeline import disk_plan
    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.memory_plan import Launch, Shape, check
    from rgsd_pipeline.models import resolve_model

    config = load_config(config_path, list(overrides))
    # config.json alone: no weights downloaded to plan
    shape = Shape.of(resolve_model(config.model, weights=False))
    launch = Launch(nodes, gpus_per_node, gpu_memory_gib)
    click.echo(check(shape, config, launch))
    click.echo(disk_plan.describe(shape, config, launch, disk_gbps))
