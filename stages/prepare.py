"""Stage `prepare`: rubric data files -> canonical prompt shards of a run.

    rgsd-pipeline prepare --config configs/tiny.yaml --run runs/t
    rgsd-pipeline prepare --config configs/tiny.yaml --run runs/t --data my.jsonl --format rar
    rgsd-pipeline prepare --run runs/t --show 2        # what student and teacher see

Reads every data source, quarantines bad rows with file, row, field and reason (prompts/quarantine.jsonl),
de-duplicates, drops prompts over the token budget, splits train / held-out by a seeded hash of each question,
writes prompts/part-*.parquet, freezes the resolved config into runs/<name>/run.yaml (its recipe digested), then
manifest.json and _SUCCESS. A complete prompts/ is left as it is. A prepare that finds no training prompt
writes the quarantine and no run.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pyarrow as pa

from rgsd_pipeline import layout
from rgsd_pipeline.config import to_dict
from rgsd_pipeline.fingerprints import fingerprint, tokenizer_fingerprint
from rgsd_pipeline.hub import pin_commits
from rgsd_pipeline.ingest import ingest
from rgsd_pipeline.models import check_loadable, load_tokenizer, resolve_model
from rgsd_pipeline.recipe import command_config, freeze, load_run_config, made_under, placement_of, use_placement
from rgsd_pipeline.render import chat_ids, chat_text, check_template, student_messages, teacher_messages
from rgsd_pipeline.rows import FORMATS
from rgsd_pipeline.shards import (
    ArtifactError,
    ShardPlan,
    StageOutput,
    is_complete,
    read_stage,
    split_into_shards,
    validate_table,
    write_jsonl_atomic,
)
from rgsd_pipeline.sources import source_fingerprint, source_label, source_path
from schemas import PROMPTS, QUARANTINE


def prepare(run: Path, config_path: str | None, overrides: list[str], data_specs: list[str], fmt: str | None) -> None:
    # 1. Resolve the config; a run that exists starts from its frozen run.yaml, and what is given on top of it must
    #    agree with its recipe (check_frozen shows any difference). run.yaml is written once the prompts are, so a
    #    prepare that fails (bad data, no valid rows) leaves no recipe behind for a retry to be refused against.
    if data_specs:
        overrides = [*overrides, f"data.sources={json.dumps(list(data_specs))}"]
    if fmt:
        overrides = [*overrides, f"data.format={fmt}"]
    config = command_config(run, config_path, overrides)
    use_placement(placement_of(config))
    check_template(config.template)

    out_dir = layout.prompts_dir(run)
    for spec in config.data.sources:  # a missing file, a device or a pipe is named before anything is read
        source_path(spec)
    config = pin_commits(config)  # the commits of its Hub ids, resolved now, written into run.yaml with it
    model_path = resolve_model(config.model)
    # Refused now rather than at the first rollout: pickle weights, a folder that needs its own code.
    check_loadable(model_path, config.model.allow_pickle_weights, config.model.trust_remote_code)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    inputs = {
        "config": fingerprint({"data": to_dict(config.data), "template": to_dict(config.template)}),
        "tokenizer": tokenizer_fingerprint(model_path),
        **{f"source:{source_label(spec)}": source_fingerprint(spec) for spec in config.data.sources},
    }
    if is_complete(out_dir):
        read_stage(out_dir, PROMPTS, expect_inputs=inputs)
        freeze(run, config)  # a kill between the prompts and run.yaml left none
        click.echo(f"prompts already complete in {out_dir}")
        return

    # 2. Read, check and normalise every row.
    result = ingest(config.data, config.template, tokenizer)
    click.echo(result.summary())
    quarantine = validate_table(pa.Table.from_pylist(result.quarantine, schema=QUARANTINE.arrow), QUARANTINE,
                                str(layout.quarantine_file(run)))
    training = sum(p["split"] == "train" for p in result.prompts)
    if not training:
        where = ""
        if result.quarantine:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(layout.quarantine_file(run), quarantine.to_pylist())
            where = f"; why each row was rejected: {layout.quarantine_file(run)}"
        what = (f"all {len(result.prompts)} valid prompts fell in the held-out split (data.heldout_fraction="
                f"{config.data.heldout_fraction}): lower it or add data" if result.prompts else
                "no valid prompts in " + ", ".join(map(source_label, config.data.sources)))
        raise ArtifactError(what + where)

    # 3. Write prompt shards, the quarantine, run.yaml, the manifest and _SUCCESS.
    pieces = split_into_shards(result.prompts, config.data.rows_per_shard)
    with StageOutput(out_dir, PROMPTS, inputs, ShardPlan(len(pieces)), made_under(config)) as out:
        write_jsonl_atomic(layout.quarantine_file(run), quarantine.to_pylist())
        for index in out.todo():
            out.write_shard(index, pa.Table.from_pylist(pieces[index], schema=PROMPTS.arrow))
        freeze(run, config)
        out.finalize()
    rejected = f"; {len(result.quarantine)} rejected rows in {layout.quarantine_file(run)}" if result.quarantine else ""
    click.echo(f"wrote {len(result.prompts)} prompts in {len(pieces)} shard(s) to {out_dir}{rejected}")


def show(run: Path, count: int) -> None:
    """Print exactly what the student and the teacher read for the first `count` prompts."""
    config = load_run_config(run)
    tokenizer = load_tokenizer(resolve_model(config.model), config.model.trust_remote_code)
    prompts = read_stage(layout.prompts_dir(run), PROMPTS).lazy().head(count).collect().to_dicts()
    for row in prompts:
        for who, messages in (("student", student_messages(row, config.template)),
                              ("teacher", teacher_messages(row, config.template))):
            n_tokens = len(chat_ids(tokenizer, messages))
            where = f"{row['domain']}, {row['split']}, {n_tokens} tokens"
            click.secho(f"──── {who} view of {row['prompt_id']} ({where}) ────", bold=True)
            click.echo(chat_text(tokenizer, messages))
        click.echo()


@click.command("prepare")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe (first start of a run).")
@click.option("--run", "run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--data", "data_specs", multiple=True, help="Data source (repeatable); replaces data.sources.")
@click.option("--format", "fmt", type=click.Choice(["auto", *FORMATS]),
              help="Row format of the sources (default: detected per row).")
@click.option("--show", "show_count", type=int, default=0, help="Print the student and teacher views of N prompts.")
@click.argument("overrides", nargs=-1)
def command(config_path, run, data_specs, fmt, show_count, overrides):
    """Ingest rubric data into canonical prompt shards.

    OVERRIDES are section.key=value pairs applied on top of the config, e.g. data.heldout_fraction=0.2.
    """
    prepare(run, config_path, list(overrides), list(data_specs), fmt)
    if show_count:
        show(run, show_count)
