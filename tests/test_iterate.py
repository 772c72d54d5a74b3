"""Iterations end to end: `iterate`, `make iterate`, kill-and-resume mid-iteration, vLLM on a checkpoint, README."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
from helpers import CLI, ROOT, cli, copy_run
from safetensors.torch import load_file

from rgsd_pipeline.shards import read_stage
from rgsd_pipeline.signals import storage_schema
from rgsd_pipeline.trainer_state import find_state, state_global_step
from schemas import PROMPTS, ROLLOUTS


def checkpoint_weights(run, iteration):
    return load_file(run / f"iter-{iteration:03d}" / "checkpoint" / "model.safetensors")


def signals_frame(run, iteration):
    from rgsd_pipeline.recipe import load_run_config

    schema = storage_schema(load_run_config(run).score, 1024)
    return read_stage(run / f"iter-{iteration:03d}" / "signals", schema).lazy().collect()


@pytest.mark.slow
def test_two_iterations_chain_policies(two_iterations):
    chain = json.loads((two_iterations / "chain.json").read_text())
    assert [link["iteration"] for link in chain] == [0, 1]
    assert chain[1]["policy"].endswith("iter-000/checkpoint")
    assert chain[1]["policy_fingerprint"] == chain[0]["checkpoint_fingerprint"]
    assert chain[1]["rollouts"]["policy"] == chain[0]["checkpoint_fingerprint"]
    again = cli("iterate", "--run", two_iterations, "--iterations", 2).stdout
    assert again.count(": complete") == 6


@pytest.mark.slow
def test_rollouts_of_a_retrained_policy_are_refused_not_reused(two_iterations, tmp_path):
    """Retrain iteration 0 with another micro-batch size (placement: the same update up to float rounding, other
    bytes): iteration 1's rollouts came from the old weights."""
    chain = json.loads((two_iterations / "chain.json").read_text())
    assert chain[0]["policy_fingerprint"] != chain[0]["checkpoint_fingerprint"] != chain[1]["checkpoint_fingerprint"]
    run = copy_run(two_iterations, tmp_path / "retrained")
    shutil.rmtree(run / "iter-000" / "checkpoint")
    result = cli("iterate", "--run", run, "--iterations", 2, "train.micro_batch_size=8", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{run / 'iter-001' / 'rollouts'} is stale: it was sampled from other weights than" in result.stderr
    assert (run / "iter-000" / "checkpoint" / "_SUCCESS").exists()  # iteration 0 was retrained
    provenance = json.loads((run / "iter-000" / "checkpoint" / "rgsd.json").read_text())
    assert provenance["placement"]["train.micro_batch_size"] == 8  # recorded with the checkpoint
    shutil.rmtree(run / "iter-001")
    cli("iterate", "--run", run, "--iterations", 2)  # redone from the new weights
    redone = json.loads((run / "chain.json").read_text())
    assert redone[1]["rollouts"]["policy"] == redone[0]["checkpoint_fingerprint"] != chain[0]["checkpoint_fingerprint"]


@pytest.mark.slow
def test_an_epoch_of_small_iterations_samples_every_prompt_once_on_one_schedule(two_iterations):
    sampled = [set(read_stage(two_iterations / f"iter-{i:03d}" / "rollouts", ROLLOUTS).lazy().collect()["prompt_id"])
               for i in (0, 1)]
    assert len(sampled[0]) == len(sampled[1]) == 8 and not sampled[0] & sampled[1]
    train = read_stage(two_iterations / "prompts", PROMPTS).lazy().filter(pl.col("split") == "train").collect()
    assert sampled[0] | sampled[1] == set(train["prompt_id"])
    metrics = [json.loads(line) for i in (0, 1)
               for line in (two_iterations / f"iter-{i:03d}" / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in metrics] == [1, 2]
    assert [m["lr"] for m in metrics] == pytest.approx([5e-4, 1e-3])  # one warmup across the iterations
    # Iteration 1 continued iteration 0's trainer state: the state's global step went on.
    assert state_global_step(find_state(two_iterations / "iter-001" / "checkpoint")) == 2


def rollouts_frame(run, iteration):
    return read_stage(run / f"iter-{iteration:03d}" / "rollouts", ROLLOUTS).lazy().collect()


def assert_same_run(run, reference, iterations=2):
    """The same rollouts and signals row for row, and the same weights to 1e-6, in every iteration."""
    for i in range(iterations):
        assert rollouts_frame(run, i).equals(rollouts_frame(reference, i)), i
        assert signals_frame(run, i).equals(signals_frame(reference, i)), i
        for name, tensor in checkpoint_weights(reference, i).items():
            torch.testing.assert_close(checkpoint_weights(run, i)[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_one_process_per_stage_and_the_resident_iterate_write_the_same_run(two_iterations, small_config, tmp_path):
    """`make iterate` runs every stage as its own process; `iterate` (two_iterations) keeps engines and trainer."""
    run = tmp_path / "made"
    make = ["make", "--no-print-directory", "iterate", f"CONFIG={small_config}", f"RUN={run}", "ITERS=2"]
    result = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert_same_run(run, two_iterations)
    again = subprocess.run(["make", "iterate", f"CONFIG={small_config}", f"RUN={run}", "ITERS=2"], cwd=ROOT,
                           capture_output=True, text=True)
    assert "rgsd-pipeline" not in again.stdout  # nothing left to do


@pytest.mark.slow
def test_lora_adapters_carried_in_memory_equal_the_per_stage_reload(small_config, tmp_path):
    """With LoRA the student is the base plus adapters that persist across iterations: kept in memory by the
    resident iterate, reloaded from the trainer state by one process per stage."""
    lora = ["train.lora=true", "train.lora_rank=4"]
    cli("iterate", "--config", small_config, "--run", tmp_path / "resident", "--iterations", 2, *lora)
    cli("iterate", "--config", small_config, "--run", tmp_path / "staged", "--iterations", 2, "--per-stage", *lora)
    assert_same_run(tmp_path / "resident", tmp_path / "staged")


@pytest.mark.long
def test_resident_iterate_killed_at_random_moments_then_rerun_gives_the_same_run(two_iterations, small_config,
                                                                                  tmp_path):
    """kill -9 of the resident `iterate` at two seeded random moments of an uninterrupted run's duration."""
    started = time.perf_counter()
    cli("iterate", "--config", small_config, "--run", tmp_path / "timed", "--iterations", 2)
    duration = time.perf_counter() - started
    rng = random.Random(20261128)
    run = tmp_path / "killed"
    for _ in range(2):
        worker = subprocess.Popen([*CLI, "iterate", "--config", str(small_config), "--run", str(run),
                                   "--iterations", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            worker.wait(timeout=rng.uniform(0.3, 0.9) * duration)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    cli("iterate", "--run", run, "--iterations", 2)
    assert_same_run(run, two_iterations)
    steps = [json.loads(line)["global_step"] for line in (run / "iter-001" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]
    assert not list(run.rglob(".*.tmp-*"))


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom rgsd_pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, 'vllm' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "iterate" in result.stdout and result.stdout.strip().endswith("False False False"), result.stdout[-500:]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_samples_from_a_trained_checkpoint(two_iterations, tmp_path):
    run = tmp_path / "vllm"
    shutil.copytree(two_iterations, run, ignore=shutil.ignore_patterns("iter-001"))
    out = cli("rollout", "--run", run, "--iteration", 1, "--engine", "vllm").stdout
    assert "with vllm from" in out and "iter-000/checkpoint" in out
    frame = read_stage(run / "iter-001" / "rollouts", ROLLOUTS).lazy().collect()
    assert frame.height == 8 and (frame["response_token_ids"].list.len() > 0).all()


@pytest.mark.slow
def test_report_prints_before_and_after(two_iterations):
    out = cli("report", "--run", two_iterations, "--iteration", 1, "--heldout", 3).stdout
    assert re.search(r"held-out JSD\s+before \d+\.\d+ -> after \d+\.\d+", out)
    assert "before:" in out and "after:" in out and f"rgsd-pipeline inspect {two_iterations} --iteration 1" in out


def test_readme_python_snippets_run(two_iterations, monkeypatch):
    text = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(two_iterations.parent)
    namespace = {}
    for snippet in snippets:
        exec(snippet.replace("runs/demo", str(two_iterations)), namespace)  # noqa: S102
    assert namespace["per_token"].height > 0
    assert namespace["tokens"].collect().height > 0


def twenty_rows(path, suffix=""):
    """The first 20 RubricHub rows of the bundled data, each prompt with `suffix` appended."""
    rows = [json.loads(line) for line in (ROOT / "rgsd_pipeline" / "data" / "medsci.jsonl").read_text().splitlines()]
    for row in rows[:20]:
        row["prompt"][-1]["content"] += suffix
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:20]))
    return path


@pytest.mark.slow
def test_rollouts_of_prompts_that_were_prepared_again_from_a_changed_file_are_refused(tmp_path):
    """Change the source file, delete prompts/ and rerun: iterate prepares again, then must not reuse iteration 0's
    rollouts of the old prompts (the stage command refuses them too)."""
    data, run = twenty_rows(tmp_path / "rubrichub.jsonl"), tmp_path / "run"
    settings = ["engine.kind=hf", "rollout.max_new_tokens=8", "train.batch_size=8", "train.micro_batch_size=8"]
    cli("iterate", "--config", "configs/tiny.yaml", "--run", run, "--iterations", 1, f"data.sources=[{data}]",
        *settings)
    twenty_rows(data, " Please answer briefly.")
    shutil.rmtree(run / "prompts")
    result = cli("iterate", "--run", run, "--iterations", 1, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (f"{run / 'iter-000' / 'rollouts'} is stale: it was sampled from other prompts than {run / 'prompts'}"
            in result.stderr), result.stderr[-2000:]
    refused = cli("rollout", "--run", run, "--iteration", 0, check=False)
    assert refused.returncode == 2 and "inputs.prompts" in refused.stderr, refused.stderr[-2000:]


def test_prepare_on_an_existing_run_reads_its_run_yaml(tmp_path):
    """Without --config, prepare starts from the frozen run.yaml (tiny.yaml's pitfalls: avoid), not the defaults."""
    data, run = twenty_rows(tmp_path / "rubrichub.jsonl"), tmp_path / "run"
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run, "--data", data)
    assert "prompts already complete" in cli("prepare", "--run", run, "--data", data).stdout
    changed = cli("prepare", "--run", run, "template.pitfalls=inline", check=False)
    assert changed.returncode == 2 and "template.pitfalls: 'avoid' -> 'inline'" in changed.stderr
    # iterate on that run: a recipe override that differs from run.yaml is refused, not silently left unused
    ignored = cli("iterate", "--run", run, "--iterations", 1, "train.epochs=4", check=False)
    assert ignored.returncode == 2 and "train.epochs: 1 -> 4" in ignored.stderr, ignored.stderr[-2000:]
    # a stage command takes placement, and refuses the recipe
    refused = cli("rollout", "--run", run, "--iteration", 0, "rollout.temperature=0.5", check=False)
    assert refused.returncode == 2 and "rollout.temperature is part of the run's recipe" in refused.stderr


@pytest.mark.slow
def test_a_replaced_checkpoint_is_refused_and_the_chain_left_alone(two_iterations, tmp_path):
    """iter-000's weights copied over iter-001's: every reader of the checkpoint refuses it by name."""
    run = copy_run(two_iterations, tmp_path / "run")
    chain = json.loads((run / "chain.json").read_text())
    replaced = run / "iter-001" / "checkpoint" / "model.safetensors"
    shutil.copy(run / "iter-000" / "checkpoint" / "model.safetensors", replaced)
    result = cli("iterate", "--run", run, "--iterations", 3, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{replaced} does not hold what was written there" in result.stderr, result.stderr[-2000:]
    rewritten = json.loads((run / "chain.json").read_text())
    assert rewritten == chain[:len(rewritten)] and not (run / "iter-002").exists()  # no link records the swap
    report = cli("report", "--run", run, "--iteration", 1, "--heldout", 2, check=False)
    assert report.returncode == 2 and f"{replaced} does not hold" in report.stderr, report.stderr[-2000:]


@pytest.mark.slow
def test_a_damaged_trainer_state_is_refused_not_trained_on(two_iterations, tmp_path):
    """A flipped bit in iteration 0's fp32 weights, then iteration 1 trained again, which continues from that state."""
    run = copy_run(two_iterations, tmp_path / "run")
    shutil.rmtree(run / "iter-001")
    state = run / "iter-000" / "checkpoint" / "trainer_state" / "weights.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x10
    state.write_bytes(bytes(data))
    result = cli("iterate", "--run", run, "--iterations", 2, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{state} does not match its checksum" in result.stderr, result.stderr[-2000:]
    assert not (run / "iter-001" / "checkpoint" / "_SUCCESS").exists()
