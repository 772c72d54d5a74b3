"""Config loading, overrides, validation and the run.yaml freeze."""

import re

import pytest
import yaml

from rgsd_pipeline.config import ConfigError, load_config, reference, reference_markdown
from rgsd_pipeline.recipe import freeze_or_check, load_run_config

ROOT = __import__("pathlib").Path(__file__).parent.parent


def test_recipes_load_and_overrides_apply():
    config = load_config(ROOT / "configs" / "tiny.yaml", ["data.heldout_fraction=0.25", "model.dtype=bfloat16",
                                                          "data.sources=[a.jsonl, b.parquet]"])
    assert config.model.path == "builtin:tiny"
    assert config.data.heldout_fraction == 0.25 and config.model.dtype == "bfloat16"
    assert config.data.sources == ["a.jsonl", "b.parquet"]


@pytest.mark.parametrize("override, message", [
    ("data.heldout_fractoin=0.2", "unknown key 'data.heldout_fractoin'; did you mean 'heldout_fraction'"),
    ("data.rows_per_shard=many", "data.rows_per_shard: expected int, got str 'many'"),
    ("data.rows_per_shard=-5", "data.rows_per_shard: -5 is below the minimum 1"),
    ("model.dtype=float8", "model.dtype: 'float8' is not one of float32, bfloat16, float16"),
    ("model.trust_remote_code=1", "model.trust_remote_code: expected bool, got int"),
    ("nonsense", "not of the form section.key=value"),
    ("train.beta=1.5", "train.beta: 1.5 is above the maximum 1.0"),
    ("train.clip=vocab", "train.clip: 'vocab' is not one of entry, soft, token, none"),
    ("train.loss=sampled_reverse_kl train.distill_temperature=2",
     "train.distill_temperature=2.0 with train.loss=sampled_reverse_kl"),
    ("train.lora=true train.parallel=fsdp", "train.parallel=fsdp with train.lora=true is not supported"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny.yaml", override.split())


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3")
    with pytest.raises(ConfigError, match=f"{scalar}: model: expected a mapping"):
        load_config(scalar)


def test_freeze_then_refuse_a_different_config(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    freeze_or_check(tmp_path, config)
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["model"]["path"] == "builtin:tiny"
    freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml"))  # same config: accepted
    assert load_run_config(tmp_path) == config
    with pytest.raises(ConfigError, match=r"data\.split_seed: 0 -> 3"):
        freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml", ["data.split_seed=3"]))


def test_a_run_frozen_before_an_option_existed_reads_it_as_its_default(tmp_path):
    """A run.yaml written by an earlier release lacks the options added since (and the digest line); the run used
    their defaults, so the same recipe is accepted and only a different value is refused."""
    freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml"))
    frozen = yaml.safe_load((tmp_path / "run.yaml").read_text())
    del frozen["train"]["epochs"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(frozen))  # as an earlier release wrote it: no digest, no record
    (tmp_path / ".run.yaml.frozen").unlink()
    freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml"))
    with pytest.raises(ConfigError, match=r"train\.epochs: 1 -> 4"):
        freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml", ["train.epochs=4"]))


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_non_finite_numbers_are_refused_when_the_config_loads(value):
    with pytest.raises(ConfigError, match="train.learning_rate: .* is not a finite number"):
        load_config(ROOT / "configs" / "tiny.yaml", [f"train.learning_rate={value}"])


def test_holding_out_every_prompt_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="data.heldout_fraction=1.0 holds out every prompt"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.heldout_fraction=1.0"])


def test_a_hand_edit_of_the_recipe_in_run_yaml_is_refused_naming_the_keys(tmp_path):
    freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml"))
    frozen = tmp_path / "run.yaml"
    assert re.search(r"^# recipe digest: [0-9a-f]{64}$", frozen.read_text(), re.MULTILINE)
    original = frozen.read_text()
    frozen.write_text(original.replace("learning_rate: 1.0e-05", "learning_rate: 0.001")
                      .replace("top_k: 20", "top_k: 5"))
    with pytest.raises(ConfigError) as refused:
        load_run_config(tmp_path)
    message = str(refused.value)
    assert f"{frozen} was edited after the run started" in message
    assert "train.learning_rate: 1e-05 -> 0.001" in message and "score.top_k: 20 -> 5" in message
    assert f"rgsd-pipeline iterate --config {frozen} --run NEW_RUN_FOLDER" in message
    # the edited file starts a new run as it is (its comments are comments)
    assert load_config(frozen).train.learning_rate == 1e-3
    # removing the digest line does not hide the edit
    frozen.write_text("".join(line for line in frozen.read_text().splitlines(True) if "recipe digest" not in line))
    with pytest.raises(ConfigError, match="the digest line was removed"):
        load_run_config(tmp_path)
    # placement keys are not the recipe: editing them is accepted
    frozen.write_text(original.replace("kind: auto", "kind: hf", 1))
    assert load_run_config(tmp_path).engine.kind == "hf"


def test_a_command_may_override_placement_but_not_the_recipe(tmp_path, monkeypatch):
    from rgsd_pipeline.recipe import PLACEMENT, PLACEMENT_ENV, placement_of, use_placement

    monkeypatch.setenv(PLACEMENT_ENV, "{}")  # restored after the test: use_placement sets it
    freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml"))
    use_placement(["engine.score_kind=server", "engine.teacher_urls=[http://a:8000/v1, http://b:8000/v1]",
                   "train.micro_batch_size=2"])
    config = load_run_config(tmp_path)
    assert config.engine.teacher_urls == ["http://a:8000/v1", "http://b:8000/v1"]
    assert placement_of(config)["train.micro_batch_size"] == 2
    with pytest.raises(ConfigError, match="train.learning_rate is part of the run's recipe, frozen in run.yaml"):
        use_placement(["train.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="engine.hf_batch_size: -1 is below the minimum 1"):
        use_placement(["engine.hf_batch_size=-1"])
    with pytest.raises(ConfigError, match="unknown key 'engine.kinds'"):
        use_placement(["engine.kinds=hf"])
    # a different placement in a config given again is this command's, not a different recipe
    freeze_or_check(tmp_path, load_config(ROOT / "configs" / "tiny.yaml", ["engine.kind=hf", "train.parallel=fsdp"]))
    for key in PLACEMENT:  # every placement key is a field
        section, name = key.split(".")
        assert hasattr(getattr(config, section), name), key


def test_every_field_is_documented():
    rows = reference()
    assert len(rows) > 15 and all(help_text for _, _, help_text in rows)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_clips_per_entry(recipe):
    config = load_config(recipe)
    assert config.train.clip == "entry" and config.train.master_dtype == "float32"


def test_readme_config_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate the README table: rgsd-pipeline config-reference --markdown"
    assert all(f"`{key}`" in readme for key, _, _ in reference())


def test_every_named_list_is_spelled_once_and_handled_where_it_is_implemented():
    """A data format, engine kind or clip mode is named once (rgsd_pipeline/choices.py): the config's field types, the
    command-line choices and the implementing module read that list, and the module handles every name."""
    import typing

    import torch

    from rgsd_pipeline import choices, rows
    from rgsd_pipeline.config import DataConfig, EngineConfig, TrainConfig
    from rgsd_pipeline.config import choices as allowed
    from rgsd_pipeline.engines import KINDS, resolve_kind
    from rgsd_pipeline.losses import CLIP_MODES, distill_per_token
    from stages.prepare import command as prepare

    formats, kinds, clips = (choices.names(t) for t in (choices.RowFormat, choices.EngineKind, choices.ClipMode))
    assert allowed(typing.get_type_hints(DataConfig)["format"]) == ("auto", *formats) == ("auto", *rows.FORMATS)
    assert tuple(next(p for p in prepare.params if p.name == "fmt").type.choices) == ("auto", *formats)
    engine = typing.get_type_hints(EngineConfig)
    teachers = choices.names(choices.TeacherKind)
    assert allowed(engine["kind"]) == KINDS == ("auto", *kinds) and allowed(engine["score_kind"]) == ("", "auto",
                                                                                                   *teachers)
    assert allowed(typing.get_type_hints(TrainConfig)["clip"]) == CLIP_MODES == clips
    row = {"prompt": [{"role": "user", "content": "q"}], "question": "q", "rubrics": [{"criterion": "c", "points": 1}],
           "Rubrics": [{"criterion": "c", "points": 1}], "rubric": [{"description": "c", "weight": 1}]}
    for fmt in formats:  # every format has its branch (a row with every key, so only the branch decides)
        row_of = {"rubrichub": ("prompt", "Rubrics"), "rar": ("question", "rubric"),
                  "healthbench": ("prompt", "rubrics"), "generic": ("prompt", "rubric")}[fmt]
        assert rows.normalize({k: row[k] for k in row_of}, fmt)["rubric"][0]["criterion"] == "c"
    for kind in teachers:
        assert resolve_kind(kind) == kind
    buckets = torch.log_softmax(torch.randn(3, 5), -1)
    for clip in clips:
        distill_per_token(buckets, buckets.roll(1, -1), 0.5, clip, 0.05)
