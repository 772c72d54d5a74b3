"""Fault injection (seeded, bounded): kill -9 at random moments, corrupt bytes, a file-size limit, a second writer.

Every stage of one iteration is killed several times at seeded random moments and rerun; its output must
then equal an uninterrupted run's, with every row exactly once and every checksum valid.
"""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml
from helpers import CLI, ROOT, cli, copy_run
from safetensors.numpy import load_file

from rgsd_pipeline.shards import exclusive_lock, read_stage
from rgsd_pipeline.signals import storage_schema
from schemas import PROMPTS, ROLLOUTS

SEED = 20261128
KILLS_PER_STAGE = 2
STAGES = ("prepare", "rollout", "score", "train")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["engine"]["kind"] = "hf"
    config["data"].update(max_prompts=24, rows_per_shard=4)
    config["train"] = {"batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "clip": "none", "save_every": 1}
    path = tmp_path_factory.mktemp("faults") / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage_args(stage, run, config_file):
    if stage == "prepare":
        return ["prepare", "--config", config_file, "--run", run]
    return [stage, "--run", run, "--iteration", 0]


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """An uninterrupted iteration, and how long each stage took."""
    run = tmp_path_factory.mktemp("reference") / "run"
    durations = {}
    for stage in STAGES:
        started = time.perf_counter()
        cli(*stage_args(stage, run, config_file))
        durations[stage] = time.perf_counter() - started
    return run, durations


def rows(run, stage):
    if stage == "prepare":
        return read_stage(run / "prompts", PROMPTS).lazy().collect().to_dicts()
    if stage == "rollout":
        return read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect().to_dicts()
    from rgsd_pipeline.recipe import load_run_config

    schema = storage_schema(load_run_config(run).score, 1024)
    return read_stage(run / "iter-000" / "signals", schema).lazy().collect().to_dicts()


def kill_at(args, delay):
    worker = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker.wait(delay)
        return False  # finished before the kill
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        return True


@pytest.mark.long
def test_random_kills_then_rerun_equal_an_uninterrupted_run(reference, config_file, tmp_path):
    reference_run, durations = reference
    run = tmp_path / "run"
    draw = random.Random(SEED)
    killed = 0
    for stage in STAGES:
        args = stage_args(stage, run, config_file)
        for _ in range(KILLS_PER_STAGE):
            killed += kill_at(args, draw.uniform(0.3, 1.0) * durations[stage])
        cli(*args)
        if stage == "train":
            mine = load_file(str(run / "iter-000" / "checkpoint" / "model.safetensors"))
            theirs = load_file(str(reference_run / "iter-000" / "checkpoint" / "model.safetensors"))
            assert mine.keys() == theirs.keys()
            for name in mine:
                np.testing.assert_allclose(mine[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)
        else:
            got, want = rows(run, stage), rows(reference_run, stage)
            keys = [(r.get("prompt_id"), r.get("sample_idx")) for r in got]
            assert len(keys) == len(set(keys)) == len(want), f"{stage}: lost or duplicated rows"
            assert got == want, f"{stage}: output differs from the uninterrupted run"
        folder = {"prepare": run / "prompts", "rollout": run / "iter-000" / "rollouts",
                  "score": run / "iter-000" / "signals", "train": run / "iter-000" / "checkpoint"}[stage]
        assert not list(folder.glob(".*.tmp-*")), f"{stage}: temporary files left behind"
    assert killed >= len(STAGES)  # most kills landed while a stage was running


def flip_byte(path, offset=200):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_flipped_byte_is_named_and_refused(reference, tmp_path):
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "iter-000" / "signals")
    shutil.rmtree(run / "iter-000" / "checkpoint")
    shard = run / "iter-000" / "rollouts" / "part-00002.parquet"
    flip_byte(shard)
    result = cli("score", "--run", run, "--iteration", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{shard} does not match its checksum" in result.stderr


def limited_file_size(limit_bytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.slow
def test_a_file_size_limit_fails_cleanly_and_resume_completes(reference, tmp_path):
    reference_run, _ = reference
    run = copy_run(reference_run, tmp_path / "run", keep=("prompts",))
    result = subprocess.run([*CLI, "rollout", "--run", str(run), "--iteration", "0"], cwd=ROOT, capture_output=True,
                            text=True, preexec_fn=limited_file_size(2048),
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot write" in result.stderr and "File too large" in result.stderr
    out = run / "iter-000" / "rollouts"
    assert not list(out.glob(".*.tmp-*")) and not (out / "_SUCCESS").exists()
    visible = sorted(p.name for p in out.glob("part-*.parquet"))
    recorded = sorted(p.name.replace(".json", ".parquet") for p in (out / ".progress").glob("part-*.json"))
    assert visible == recorded  # every visible shard is a complete, recorded one
    cli("rollout", "--run", run, "--iteration", 0)
    assert rows(run, "rollout") == rows(reference_run, "rollout")


@pytest.mark.slow
def test_a_second_writer_is_refused_by_the_lock(reference, tmp_path):
    reference_run, _ = reference
    run = copy_run(reference_run, tmp_path / "run", keep=("prompts",))
    progress = run / "iter-000" / "rollouts" / ".progress"
    progress.mkdir(parents=True)
    with exclusive_lock(progress / "lock-0-of-1", "held by the test"):
        result = cli("rollout", "--run", run, "--iteration", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is being written by another process" in result.stderr
    cli("rollout", "--run", run, "--iteration", 0)  # once the holder is gone, the stage runs


@pytest.mark.slow
def test_a_second_trainer_of_an_iteration_is_refused_by_its_lock(reference, tmp_path):
    """`train --iteration 0` while another process trains iteration 0 (an `iterate`, say) holds its lock."""
    from rgsd_pipeline import layout

    reference_run, _ = reference
    run = copy_run(reference_run, tmp_path / "run", keep=("prompts", "iter-000"),
                   without=("checkpoint", "metrics.jsonl"))
    with exclusive_lock(layout.train_lock_file(run, 0), "held by the test"):
        result = cli("train", "--run", run, "--iteration", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "is being written by another process" in result.stderr
    assert not (run / "iter-000" / "metrics.jsonl").exists() and not (run / "iter-000" / "checkpoint").exists()
    cli("train", "--run", run, "--iteration", 0)  # once the holder is gone, it trains


@pytest.mark.slow
def test_a_file_size_limit_during_the_checkpoint_write_fails_cleanly_and_a_rerun_writes_the_same_weights(
        reference, tmp_path):
    """The tiny model's weights are 2.2 MB: a 1 MB limit stops the checkpoint write (it was an EFBIG traceback)."""
    reference_run, _ = reference
    run = copy_run(reference_run, tmp_path / "run", keep=("prompts", "iter-000"),
                   without=("checkpoint", "metrics.jsonl"))
    # No state mid-iteration (placement): the checkpoint, not a trainer state, is the first file past the limit.
    result = subprocess.run([*CLI, "train", "--run", str(run), "--iteration", "0", "train.save_every=100"], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=limited_file_size(1 << 20),
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    checkpoint = run / "iter-000" / "checkpoint"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot write the checkpoint {checkpoint}: File too large; nothing was published" in result.stderr
    assert not (checkpoint / "_SUCCESS").exists() and not list(checkpoint.glob("*.safetensors"))
    cli("train", "--run", run, "--iteration", 0)
    weights = "iter-000/checkpoint/model.safetensors"
    assert (run / weights).read_bytes() == (reference_run / weights).read_bytes()
    steps = [json.loads(line)["step"] for line in (run / "iter-000" / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert len(steps) == len(set(steps)), steps
