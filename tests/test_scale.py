"""The data-parallel resident `iterate` on CPUs (gloo): under torchrun and under Ray Train, equal to one process.

Multi-process runs: marked `scale` (`make test-scale`, which CI runs after `make test`).
"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from helpers import ROOT, cli
from safetensors.torch import load_file

from rgsd_pipeline.shards import read_stage
from rgsd_pipeline.signals import storage_schema
from schemas import ROLLOUTS

pytestmark = [pytest.mark.scale, pytest.mark.slow]
SEED = 20261202


def torchrun_iterate(config, run, port, iterations=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            "-m", "rgsd_pipeline", "iterate", "--config", str(config), "--run-dir", str(run),
            "--iterations", str(iterations)]


def stage_frame(run, iteration, stage):
    from rgsd_pipeline.recipe import load_run_config

    schema = ROLLOUTS if stage == "rollouts" else storage_schema(load_run_config(run).score, 1024)
    return read_stage(run / f"iter-{iteration:03d}" / stage, schema).lazy().collect()


def assert_equivalent_runs(run, reference, iterations=2):
    """Rollouts identical token for token, log-probs and signals to 1e-6, checkpoint weights to 1e-5 (thread counts
    and summation order differ between one process and two)."""
    for i in range(iterations):
        for stage, exact in (("rollouts", ("prompt_id", "sample_idx", "response_token_ids", "finish_reason")),
                             ("signals", ("prompt_id", "sample_idx", "topk_ids", "loss_mask", "status"))):
            got, want = stage_frame(run, i, stage), stage_frame(reference, i, stage)
            assert got.select(exact).equals(want.select(exact)), (i, stage)
            for column in set(got.columns) - set(exact):
                if got[column].dtype.is_numeric() or str(got[column].dtype).startswith("List"):
                    values = [np.asarray(v, dtype=np.float64) for v in got[column].to_list()]
                    wanted = [np.asarray(v, dtype=np.float64) for v in want[column].to_list()]
                    for a, b in zip(values, wanted, strict=True):
                        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=f"{stage} {column} {i}")
        ours = load_file(run / f"iter-{i:03d}" / "checkpoint" / "model.safetensors")
        for name, tensor in load_file(reference / f"iter-{i:03d}" / "checkpoint" / "model.safetensors").items():
            torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0)
    chain = [link["iteration"] for link in __import__("json").loads((run / "chain.json").read_text())]
    assert chain == list(range(iterations))


@pytest.fixture(scope="module")
def two_ranks(small_config, tmp_path_factory):
    """2 iterations of 8 prompts under torchrun with 2 ranks, HF engines, gloo; and how long it took."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    started = time.perf_counter()
    result = subprocess.run(torchrun_iterate(small_config, run, 29611), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "on each of 2 ranks" in result.stdout and "2 iteration(s) complete" in result.stdout
    return run, time.perf_counter() - started


def test_two_ranks_under_torchrun_write_the_run_one_process_writes(two_ranks, two_iterations):
    run, _ = two_ranks
    assert_equivalent_runs(run, two_iterations)
    for i in range(2):  # each rank held its own worker lock: it wrote its own shards
        for stage in ("rollouts", "signals"):
            locks = sorted(p.name for p in (run / f"iter-{i:03d}" / stage / ".progress").glob("lock-*-of-*"))
            assert locks == ["lock-0-of-2", "lock-1-of-2"], (i, stage, locks)


def test_a_rank_killed_at_a_random_moment_then_rerun_gives_the_same_run(two_ranks, two_iterations, small_config,
                                                                         tmp_path):
    """SIGKILL of rank 1 at a seeded random moment: the job ends naming the rank; the same command resumes."""
    _, duration = two_ranks
    run = tmp_path / "killed"
    job = subprocess.Popen(torchrun_iterate(small_config, run, 29612), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    moment = random.Random(SEED).uniform(0.4, 0.8) * duration
    time.sleep(moment)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert ranks, f"rank 1 was not running {moment:.1f} s in"
    ranks[0].send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "rank      : 1" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    os.killpg(job.pid, signal.SIGKILL) if job.poll() is None else None
    result = subprocess.run(torchrun_iterate(small_config, run, 29613), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_equivalent_runs(run, two_iterations)
    assert not list(run.rglob(".*.tmp-*"))


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(mark):
    """(process name, address, port) of every listening TCP socket held by a process whose environment carries
    `mark`, however it was started (Ray's agents and workers are not all children of the command)."""
    found = set()
    for process in psutil.process_iter(["name"]):
        try:
            if process.environ().get("RGSD_TEST_MARK") != mark:
                continue
            for sock in process.net_connections(kind="inet"):
                if sock.status == psutil.CONN_LISTEN:
                    found.add((process.info["name"], sock.laddr.ip, sock.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_ray_train_workers_write_the_run_torchrun_writes(two_ranks, tmp_path, small_config):
    """The same rank function as Ray Train workers on a local cluster: every socket any of its processes listens on
    while the run goes is on loopback, and Ray's token auth is on with no token file written to the home folder."""
    pytest.importorskip("ray", reason="the `ray` extra (make setup installs it)")
    run, home, mark = tmp_path / "ray", tmp_path / "home", f"ray-{os.getpid()}-{time.time_ns()}"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(home), RGSD_TEST_MARK=mark)
    job = subprocess.Popen([sys.executable, "-m", "rgsd_pipeline", "iterate", "--config", str(small_config), "--run",
                            str(run), "--iterations", "2", "--ray", "local", "--workers", "2"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    listeners, auth_modes = set(), set()
    try:
        while job.poll() is None:
            listeners |= listening_sockets(mark)
            for process in psutil.process_iter(["name"]):
                try:
                    if process.environ().get("RGSD_TEST_MARK") == mark and "raylet" in process.info["name"]:
                        auth_modes.add(process.environ().get("RAY_AUTH_MODE"))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            time.sleep(0.5)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert len(listeners) >= 5, listeners  # GCS, raylet, object manager, agents, workers were seen
    assert {ip for _, ip, _ in listeners} <= LOOPBACK, sorted(s for s in listeners if s[1] not in LOOPBACK)
    assert auth_modes == {"token"} and not (home / ".ray" / "auth_token").exists()
    assert_equivalent_runs(run, two_ranks[0])
    again = cli("iterate", "--run", run, "--iterations", 2).stdout
    assert again.count(": complete") == 6
