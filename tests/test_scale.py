"""The data-parallel resident `iterate` on CPUs (gloo): under torchrun and under Ray Train, equal to one process.

Multi-process runs: marked `scale` (`make test-scale`, which CI runs after `make test`).
"""

import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import ROOT, assert_equivalent_runs, cli, torchrun_iterate

pytestmark = [pytest.mark.scale, pytest.mark.slow]
SEED = 20261202


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


def uneven(per_step):
    return ["engine.kind=hf", "data.max_prompts=16", "data.rows_per_shard=4",
            f"rollout.prompts_per_iteration={per_step}", f"train.batch_size={per_step}", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def one_process_uneven(tmp_path_factory):
    """One-process runs of 2 iterations with 1 and with 3 sequences per step, by the sequences per step."""
    runs = {}
    for per_step in (1, 3):
        runs[per_step] = tmp_path_factory.mktemp("uneven") / f"one-{per_step}"
        cli("iterate", "--config", ROOT / "configs" / "tiny.yaml", "--run", runs[per_step], "--iterations", 2,
            *uneven(per_step))
    return runs


@pytest.mark.parametrize("parallel, per_step, port", [("ddp", 1, 29621), ("fsdp", 1, 29622), ("fsdp", 3, 29623)])
def test_ranks_with_different_numbers_of_micro_batches_make_the_one_process_update(one_process_uneven, tmp_path,
                                                                                   parallel, per_step, port):
    """1 or 3 sequences per step on 2 ranks with micro-batches of 1: rank 0 makes more passes than rank 1, which may
    have none (FSDP2 hung at the first step; under DDP the rank without a sequence all-reduced a None gradient)."""
    run = tmp_path / parallel
    result = subprocess.run(torchrun_iterate(ROOT / "configs" / "tiny.yaml", run, port, 2,
                                             [*uneven(per_step), f"train.parallel={parallel}"]),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert_equivalent_runs(run, one_process_uneven[per_step], 2)
