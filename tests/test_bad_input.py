"""A user's mistakes beyond data files, and what the toolkit refuses to load or run: a clear message, exit 2,
no traceback."""

import hashlib
import json
import pickle
import shutil

import pytest
import torch
import yaml
from helpers import ROOT, cli, copy_run

from rgsd_pipeline.shards import ArtifactError
from rgsd_pipeline.trainer_state import load_state, save_state


def write_config(tmp_path, **sections):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def custom_code_model(source, target):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="house-llama", architectures=["HouseForCausalLM"],
                  auto_map={"AutoConfig": "house.HouseConfig", "AutoModelForCausalLM": "house.HouseForCausalLM"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "house.py").write_text(f"open({str(target / 'RAN')!r}, 'w').write('ran')\n"
                                     "from transformers import LlamaConfig as HouseConfig\n"
                                     "from transformers import LlamaForCausalLM as HouseForCausalLM\n")
    return target


def pickle_only_model(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return target


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown key", "wrong type", "negative size", "missing model", "pickle weights",
                                  "remote code", "broken yaml"])
def test_config_and_model_mistakes_exit_2_with_the_reason(case, tmp_path, tiny_path):
    overrides = []
    if case == "unknown key":
        config = write_config(tmp_path, train={"batch_sise": 8})
        message = "unknown key 'train.batch_sise'; did you mean 'batch_size'"
    elif case == "wrong type":
        config = write_config(tmp_path, rollout={"max_new_tokens": "lots"})
        message = "rollout.max_new_tokens: expected int"
    elif case == "negative size":
        config, overrides = write_config(tmp_path), ["rollout.max_new_tokens=-5"]
        message = "rollout.max_new_tokens: -5 is below the minimum 1"
    elif case == "missing model":
        config = write_config(tmp_path, model={"path": str(tmp_path / "nowhere")})
        message = f"model path {tmp_path / 'nowhere'} is not a local HF model folder"
    elif case == "pickle weights":
        model = pickle_only_model(tiny_path, tmp_path / "pickled")
        config, message = write_config(tmp_path, model={"path": str(model)}), "only pickle weights"
    elif case == "remote code":
        model = custom_code_model(tiny_path, tmp_path / "custom")
        config, message = write_config(tmp_path, model={"path": str(model)}), "ships its own Python code"
    else:
        config = tmp_path / "broken.yaml"
        config.write_text("train: {batch_size: 8\n")
        message = "not valid YAML"
    result = cli("prepare", "--config", config, "--run", tmp_path / "run", *overrides, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    if case == "remote code":
        assert not (tmp_path / "custom" / "RAN").exists()  # the folder's code never ran


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('MARKER', 'w').write('ran')",))


def test_trainer_state_is_never_unpickled_beyond_tensors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = tmp_path / "trainer_state"
    save_state(state, model, optimizer, step=3)
    assert load_state(state, model, optimizer) == 3
    bundle = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "extra": RunsCode()}
    (state / "optimizer.pt").write_bytes(pickle.dumps(bundle))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        load_state(state, model, optimizer)
    saved = json.loads((state / "state.json").read_text())  # a checksum forged to match: still never unpickled
    saved["files"]["optimizer.pt"] = {"sha256": hashlib.sha256((state / "optimizer.pt").read_bytes()).hexdigest(),
                                      "size": (state / "optimizer.pt").stat().st_size}
    (state / "state.json").write_text(json.dumps(saved))
    with pytest.raises(ArtifactError, match="not unpickled"):
        load_state(state, model, optimizer)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow
def test_manifest_names_that_escape_the_run_are_refused_by_a_stage(evaluated_run, tmp_path):
    run = copy_run(evaluated_run, tmp_path / "run", keep=("prompts",))
    shutil.copytree(evaluated_run / "iter-000" / "rollouts", run / "iter-000" / "rollouts")
    manifest_path = run / "iter-000" / "rollouts" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["file"] = "../../prompts/part-00000.parquet"
    manifest_path.write_text(json.dumps(manifest))
    result = cli("score", "--run", run, "--iteration", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a plain part-NNNNN.parquet inside the stage folder; refusing to read it" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "deleted", "not a manifest"])
def test_a_damaged_manifest_beside_its_success_marker_is_named_by_iterate_and_inspect(evaluated_run, tmp_path,
                                                                                      damage):
    run = copy_run(evaluated_run, tmp_path / "run", keep=("prompts", "iter-000"))
    manifest = run / "iter-000" / "rollouts" / "manifest.json"
    if damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_text("{garbage" if damage == "garbage" else "[]")
    for args in (("iterate", "--run", run, "--iterations", 1), ("inspect", run)):
        result = cli(*args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        assert f"{manifest} cannot be read" in result.stderr and f"delete {manifest.parent}" in result.stderr, args


def test_inspect_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = cli("inspect", tmp_path, check=False)  # it printed an empty table and exited 0
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path} is not a run folder (no run.yaml)" in result.stderr


def test_the_rule_judge_on_criteria_without_predicates_is_refused_before_any_answer(evaluated_run, tmp_path):
    """builtin:medsci's criteria carry no `check:` tag: the old code sampled, graded nothing, and stored a summary
    without a score that made every later `inspect` die in polars."""
    run = copy_run(evaluated_run, tmp_path / "run")
    result = cli("evaluate", "--run", run, "--iteration", "base", "--judge", "rules", "--max-prompts", 2,
                 check=False)
    assert result.returncode == 2, result.stderr
    assert "none of the" in result.stderr and "machine-checkable predicate" in result.stderr
    assert "--judge llm" in result.stderr and "Traceback" not in result.stderr
    assert not list((run / "eval").glob("*/base/answers"))


def test_a_summary_without_a_score_is_shown_as_such_by_inspect(howto_run, tmp_path):
    """An LLM judge whose every verdict was unusable leaves a summary whose score is null: `inspect` says so (the old
    code raised polars' InvalidOperationError on rounding a null column, on every later inspect)."""
    run = copy_run(howto_run, tmp_path / "run")
    cli("evaluate", "--run", run, "--iteration", "base", "--judge", "rules", "--max-prompts", 2)
    summary = next((run / "eval").glob("*/base/summary-rules.json"))
    record = json.loads(summary.read_text())
    record["overall"].update(mean=None, low=None, high=None)
    summary.write_text(json.dumps(record))
    result = cli("inspect", run, check=False)
    assert result.returncode == 0, result.stderr
    assert "no score" in result.stdout
