"""`rgsd-pipeline prepare` end to end through the real console script."""

import json

import yaml
from helpers import cli

from rgsd_pipeline.shards import read_stage
from schemas import PROMPTS


def test_help_and_version():
    assert "prepare" in cli("--help").stdout
    assert cli("--version").stdout.strip().startswith("rgsd-pipeline, version")


def test_prepare_bundled_data_then_show(tmp_path):
    run = tmp_path / "t"
    out = cli("prepare", "--config", "configs/tiny.yaml", "--run", run).stdout
    assert "122 rows read, 122 kept, 0 quarantined" in out
    for name in ("manifest.json", "_SUCCESS", "part-00000.parquet"):
        assert (run / "prompts" / name).exists()
    assert yaml.safe_load((run / "run.yaml").read_text())["name"] == "tiny"
    stage = read_stage(run / "prompts", PROMPTS)
    frame = stage.lazy().collect()
    assert frame.height == 122 and frame["prompt_id"].n_unique() == 122
    assert set(frame["split"]) == {"train", "heldout"}

    shown = cli("prepare", "--run", run, "--show", 2).stdout
    assert "prompts already complete" in shown
    assert shown.count("student view of") == 2 and shown.count("teacher view of") == 2
    first = frame.row(0, named=True)
    student, teacher = shown.split("teacher view of")[0], shown.split("teacher view of")[1]
    assert first["messages"][-1]["content"] in student and "Hidden evaluation criteria" not in student
    assert "Hidden evaluation criteria that a good response should satisfy:" in teacher
    assert first["rubric"][0]["criterion"] in teacher
    assert "<|im_start|>assistant" in teacher


def test_conflicting_config_is_refused_with_the_difference(tmp_path):
    run = tmp_path / "t"
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run)
    result = cli("prepare", "--config", "configs/tiny.yaml", "--run", run, "data.heldout_fraction=0.5", check=False)
    assert result.returncode == 2
    assert "data.heldout_fraction: 0.1 -> 0.5" in result.stderr and "Traceback" not in result.stderr


def test_mixed_file_yields_valid_rows_and_a_quarantine_entry_per_broken_row(tmp_path):
    rows = [json.dumps({"question": f"Why is thing {i} true?", "rubric": [{"title": "t", "description": f"d{i}",
                                                                           "weight": 3}]}) for i in range(6)]
    rows.insert(2, "{broken")
    rows.insert(4, json.dumps({"question": "q", "rubric": [{"title": "t", "description": "d", "weight": -1}]}))
    data = tmp_path / "rar.jsonl"
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "r"
    out = cli("prepare", "--config", "configs/tiny.yaml", "--run", run, "--data", data, "--format", "rar").stdout
    assert "6 kept, 2 quarantined" in out
    quarantine = [json.loads(line) for line in (run / "prompts" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["row"], q["field"]) for q in quarantine] == [(3, "<row>"), (5, "rubric")]
    assert read_stage(run / "prompts", PROMPTS).rows == 6


def test_user_errors_exit_2_without_traceback(tmp_path):
    result = cli("prepare", "--config", "configs/tiny.yaml", "--run", tmp_path / "x", "--data", tmp_path / "no.jsonl",
                 check=False)
    assert result.returncode == 2 and "no.jsonl does not exist" in result.stderr and "Traceback" not in result.stderr
    result = cli("prepare", "--config", "configs/tiny.yaml", "--run", tmp_path / "y", "model.path=/nowhere",
                 check=False)
    assert result.returncode == 2 and "not a local HF model folder" in result.stderr


def test_the_teacher_can_be_shown_only_criteria_with_given_tags():
    from rgsd_pipeline.config import TemplateConfig
    from rgsd_pipeline.render import student_messages, teacher_messages

    row = {"messages": [{"role": "user", "content": "Why?"}], "reference_answer": None,
           "rubric": [{"criterion": "Names insulin", "points": 4.0, "tags": ["kind:concept"]},
                      {"criterion": "Ends with In summary", "points": 2.0, "tags": ["kind:summary"]}]}
    shown = teacher_messages(row, TemplateConfig(only_tags=["kind:summary"]))[-1]["content"]
    assert "Ends with In summary" in shown and "Names insulin" not in shown
    assert "Names insulin" in teacher_messages(row, TemplateConfig())[-1]["content"]
    # Nothing left to show: the teacher reads exactly what the student reads.
    template = TemplateConfig(only_tags=["axis:none"])
    assert teacher_messages(row, template) == student_messages(row, template)
