"""`rgsd-pipeline rollout` end to end: resume after kill -9, sharded workers, too-long prompts, vLLM."""


import numpy as np
import polars as pl
import pytest
from helpers import cli, copy_run, kill_after_first_shard

from rgsd_pipeline.examples import load_examples
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import ArtifactError, read_manifest, read_stage
from rgsd_pipeline.signals import storage_schema
from schemas import ROLLOUTS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared tiny run with 7 prompt shards (16 rows each) to copy from."""
    run = tmp_path_factory.mktemp("prepared") / "run"
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run, "data.rows_per_shard=16", "engine.kind=hf")
    return run


def rollouts(run) -> pl.DataFrame:
    return read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect()


@pytest.mark.slow
def test_kill_during_rollout_then_resume_equals_uninterrupted(prepared, tmp_path):
    reference, killed = copy_run(prepared, tmp_path / "reference"), copy_run(prepared, tmp_path / "killed")
    out = cli("rollout", "--run", reference, "--iteration", 0).stdout
    assert "111 prompts, 111 samples" in out

    done_before = kill_after_first_shard(["rollout", "--run", killed, "--iteration", 0],
                                         killed / "iter-000" / "rollouts")
    assert 1 <= done_before < 7, "the kill should land between the first and the last shard"
    assert not (killed / "iter-000" / "rollouts" / "_SUCCESS").exists()

    resumed = cli("rollout", "--run", killed, "--iteration", 0).stdout
    assert f"{111 - 16 * done_before} samples in {7 - done_before} shard(s)" in resumed
    got, want = rollouts(killed), rollouts(reference)
    assert got.select("prompt_id", "sample_idx").is_unique().all() and got.height == 111
    assert got.equals(want)


@pytest.mark.slow
def test_sharded_workers_equal_one_worker(prepared, tmp_path):
    one, split = copy_run(prepared, tmp_path / "one"), copy_run(prepared, tmp_path / "split")
    cli("rollout", "--run", one, "--iteration", 0)
    first = cli("rollout", "--run", split, "--iteration", 0, "--num-shards", 2, "--shard-index", 1).stdout
    assert "completes when every worker has finished" in first
    cli("rollout", "--run", split, "--iteration", 0, "--num-shards", 2, "--shard-index", 0)
    # 7 shards of up to 16 rows for one worker; for two, 8 shards that differ by a row at most, so that each worker
    # has as many to write
    assert len(read_manifest(one / "iter-000" / "rollouts")["shards"]) == 7
    sizes = [s["rows"] for s in read_manifest(split / "iter-000" / "rollouts")["shards"]]
    assert len(sizes) == 8 and sum(sizes) == rollouts(one).height and max(sizes) - min(sizes) == 1
    got, want = rollouts(split), rollouts(one)
    exact = [c for c in want.columns if "logprobs" not in c]
    assert got.select(exact).equals(want.select(exact))  # the same tokens, whatever shares their batch
    for column in ("response_logprobs", "sampling_logprobs"):  # to float rounding: batches of other shapes
        for a, b in zip(got[column].to_list(), want[column].to_list(), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_too_long_prompts_are_skipped_with_reason_or_truncated(tmp_path):
    base = ["prepare", "--config", "configs/tiny.yaml", "model.max_model_len=80", "rollout.max_new_tokens=32",
            "engine.kind=hf"]
    cli(*base, "--run", tmp_path / "skip")
    cli("rollout", "--run", tmp_path / "skip", "--iteration", 0)
    frame = rollouts(tmp_path / "skip").with_columns(pl.col("prompt_token_ids").list.len().alias("plen"))
    skipped = frame.filter(pl.col("finish_reason").str.starts_with("skipped:"))
    assert skipped.height > 0 and (skipped["plen"] > 48).all()
    assert (skipped["response_token_ids"].list.len() == 0).all()
    assert "over model.max_model_len - rollout.max_new_tokens = 48" in skipped["finish_reason"][0]
    assert (frame.filter(~pl.col("finish_reason").str.starts_with("skipped:"))["plen"] <= 48).all()

    cli(*base, "rollout.too_long=truncate", "--run", tmp_path / "cut")
    cli("rollout", "--run", tmp_path / "cut", "--iteration", 0)
    cut = rollouts(tmp_path / "cut")
    assert not cut["finish_reason"].str.starts_with("skipped:").any()
    assert (cut["prompt_token_ids"].list.len() <= 48).all() and (cut["response_token_ids"].list.len() > 0).all()


def test_behaviour_logprobs_are_recorded_when_the_loss_reads_them(tmp_path):
    """Tempered sampling: sampling_logprobs are null unless asked for or read by the loss (sampled_reverse_kl), the
    tokens and raw log-probs do not depend on it, and a loss that reads them refuses rollouts without them, naming
    the shard, row and field."""
    tempered = ["--config", "configs/tiny.yaml", "engine.kind=hf", "data.max_prompts=6", "rollout.temperature=0.7",
                "rollout.top_k=8"]
    for name, extra in (("plain", []), ("srkl", ["train.loss=sampled_reverse_kl"])):
        cli("prepare", *tempered, *extra, "--run", tmp_path / name)
        cli("rollout", "--run", tmp_path / name, "--iteration", 0)
    plain, srkl = rollouts(tmp_path / "plain"), rollouts(tmp_path / "srkl")
    assert plain["sampling_logprobs"].is_null().all()
    assert (srkl["sampling_logprobs"].list.len() == srkl["response_token_ids"].list.len()).all()
    assert plain.drop("sampling_logprobs").equals(srkl.drop("sampling_logprobs"))
    assert (srkl["sampling_logprobs"].list.sum() > srkl["response_logprobs"].list.sum()).all()  # sharper: tempered

    run = tmp_path / "plain"
    cli("score", "--run", run, "--iteration", 0)
    stages = (read_stage(run / "iter-000" / "rollouts", ROLLOUTS),
              read_stage(run / "iter-000" / "signals", storage_schema(load_run_config(run).score, 1024)))
    assert len(load_examples(*stages)) == 6
    with pytest.raises(ArtifactError, match=r"rollouts/part-00000.parquet row 0: sampling_logprobs is null"):
        load_examples(*stages, behaviour=True)


def test_iteration_1_needs_the_previous_checkpoint(prepared, tmp_path):
    result = cli("rollout", "--run", copy_run(prepared, tmp_path / "run"), "--iteration", 1, check=False)
    assert result.returncode == 2 and "iter-000/checkpoint, which is missing or incomplete" in result.stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_rollout_through_the_cli(tmp_path):
    run = tmp_path / "v"
    # Tempered sampling with the model's raw log-probs only: one sampling pass, no behaviour log-probs.
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run, "data.max_prompts=20", "rollout.temperature=0.7",
        "rollout.top_p=0.9")
    out = cli("rollout", "--run", run, "--iteration", 0, "--engine", "vllm").stdout
    assert "with vllm" in out and "20 prompts, 20 samples" in out
    frame = rollouts(run)
    assert (frame["response_token_ids"].list.len() == frame["response_logprobs"].list.len()).all()
    assert frame["sampling_logprobs"].is_null().all()
    assert set(frame["finish_reason"]) <= {"stop", "length"}
