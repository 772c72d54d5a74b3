"""train.report_to: TensorBoard event files equal metrics.jsonl, W&B offline and MLflow runs, `none` imports nothing."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, cli, copy_run


def metrics(run, iteration=0):
    path = run / f"iter-{iteration:03d}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    run = tmp_path_factory.mktemp("tracked") / "run"
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run, "engine.kind=hf", "data.max_prompts=16",
        "rollout.max_new_tokens=16", "train.batch_size=4", "train.micro_batch_size=4", "train.learning_rate=1e-3")
    cli("rollout", "--run", run, "--iteration", 0)
    cli("score", "--run", run, "--iteration", 0)
    return run


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_jsonl_and_carry_timings_and_evaluations(scored, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_run(scored, tmp_path / "tb", keep=("prompts",), train__report_to="tensorboard")
    cli("iterate", "--run", run, "--iterations", 1)
    cli("evaluate", "--run", run, "--iteration", 0, "--max-prompts", 2)
    events = EventAccumulator(str(run / "tracking" / "tensorboard"))
    events.Reload()
    lines = metrics(run)
    assert len(lines) == 4
    for key in ("loss", "divergence", "grad_norm", "lr", "clip_fraction"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(m["global_step"], pytest.approx(m[key], rel=1e-6, abs=1e-9)) for m in lines], key
    tags = set(events.Tags()["scalars"])
    assert {"rollout/seconds", "rollout/tokens_per_s", "score/seconds", "train/seconds"} <= tags
    assert "eval/heldout/iter-000/mean_length" in tags
    assert [e.step for e in events.Scalars("eval/heldout/iter-000/mean_length")] == [4]


@pytest.mark.slow
def test_a_resumed_iteration_logs_each_step_once(scored, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_run(scored, tmp_path / "again", train__report_to="tensorboard")
    cli("train", "--run", run, "--iteration", 0)
    (run / "iter-000" / "checkpoint" / "_SUCCESS").unlink()  # as if killed after the last step
    cli("train", "--run", run, "--iteration", 0)
    events = EventAccumulator(str(run / "tracking" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [m["global_step"] for m in metrics(run)]


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store(scored, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    wandb_run = copy_run(scored, tmp_path / "wandb", train__report_to="wandb")
    cli("train", "--run", wandb_run, "--iteration", 0)
    offline = list((wandb_run / "tracking" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    mlflow_run = copy_run(scored, tmp_path / "mlflow", train__report_to="mlflow")
    cli("train", "--run", mlflow_run, "--iteration", 0)
    client = MlflowClient((mlflow_run / "tracking" / "mlruns").resolve().as_uri())
    run_id = json.loads((mlflow_run / "tracking" / "ids.json").read_text())["mlflow"]
    history = client.get_metric_history(run_id, "train/loss")
    assert [(h.step, h.value) for h in history] == [(m["global_step"], pytest.approx(m["loss"])) for m in
                                                     metrics(mlflow_run)]


def test_none_is_the_default_and_imports_nothing(tmp_path):
    code = ("import sys\nfrom rgsd_pipeline import tracking\nfrom rgsd_pipeline.config import load_config\n"
            f"config = load_config(None)\ntracking.log_training({str(tmp_path)!r}, config, None, "
            "{'global_step': 1, 'step': 1, 'loss': 0.5})\n"
            "print(config.train.report_to, [m for m in ('wandb', 'mlflow', 'tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "none []", result.stderr[-2000:]
    assert not (tmp_path / "tracking").exists()
