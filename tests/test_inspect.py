"""`rgsd_pipeline.inspect` frames against the shards they come from; the `inspect` command, its page and plot."""

import os
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
from helpers import cli

from rgsd_pipeline import inspect
from rgsd_pipeline.models import load_tokenizer
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import read_stage
from rgsd_pipeline.signals import decode_logprobs, storage_schema
from schemas import ROLLOUTS


def shards(run):
    rollouts = read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect().to_dicts()
    schema = storage_schema(load_run_config(run).score, 1024)
    signals = read_stage(run / "iter-000" / "signals", schema).lazy().collect().to_dicts()
    return rollouts, signals


@pytest.mark.slow
def test_token_frame_matches_the_shards(evaluated_run, tiny_path):
    rollouts, signals = shards(evaluated_run)
    frame = inspect.tokens(evaluated_run, 0).collect()
    tokenizer = load_tokenizer(tiny_path)
    expected_rows = 0
    for rollout, signal in zip(rollouts, signals, strict=True):
        if signal["status"] != "ok":
            continue
        expected_rows += len(rollout["response_token_ids"])
        mine = frame.filter((pl.col("prompt_id") == rollout["prompt_id"])
                            & (pl.col("sample_idx") == rollout["sample_idx"]))
        mine = mine.sort("position")
        assert mine["position"].to_list() == list(range(len(rollout["response_token_ids"])))
        assert mine["token_id"].to_list() == rollout["response_token_ids"]
        np.testing.assert_allclose(mine["policy_logprob"].to_numpy(), rollout["response_logprobs"], rtol=0, atol=0)
        np.testing.assert_allclose(mine["teacher_logprob"].to_numpy(), signal["token_logprob"], rtol=0, atol=0)
        np.testing.assert_allclose(mine["logprob_gap"].to_numpy(),
                                   np.array(rollout["response_logprobs"]) - np.array(signal["token_logprob"]),
                                   atol=1e-6)
        assert mine["mask"].to_list() == signal["loss_mask"]
        ids = np.array(signal["topk_ids"])
        assert mine["teacher_top1_id"].to_list() == ids[:, 0].tolist()
        decoded = decode_logprobs(np.array(signal["topk_logprobs"], dtype=np.uint8)).astype(np.float64)
        tail = np.array(signal["tail_logprob"], dtype=np.float64)
        rescaled = decoded - np.log(np.exp(decoded).sum(-1, keepdims=True)) + np.log1p(-np.exp(tail))[:, None]
        np.testing.assert_allclose(np.array(mine["teacher_topk_logprobs"].to_list()), rescaled, atol=1e-5)
        np.testing.assert_allclose(np.exp(rescaled).sum(-1) + np.exp(tail), 1.0, atol=1e-5)
        np.testing.assert_allclose(mine["teacher_tail_mass"].to_numpy(), np.exp(tail), rtol=1e-6)
        np.testing.assert_allclose(mine["sampling_logprob"].to_numpy(), rollout["sampling_logprobs"], rtol=0, atol=0)
        assert mine["token"].to_list() == [tokenizer.decode([i]) for i in rollout["response_token_ids"]]
        assert mine["teacher_top1"].to_list() == [tokenizer.decode([i]) for i in ids[:, 0]]
    assert frame.height == expected_rows > 0


@pytest.mark.slow
def test_rollout_frame_and_policy_table(evaluated_run):
    rollouts, signals = shards(evaluated_run)
    frame = {(r["prompt_id"], r["sample_idx"]): r
             for r in inspect.rollouts(evaluated_run, 0).collect().iter_rows(named=True)}
    assert len(frame) == len(rollouts)
    for rollout, signal in zip(rollouts, signals, strict=True):
        row = frame[(rollout["prompt_id"], rollout["sample_idx"])]
        mask = np.array(signal["loss_mask"], dtype=bool)
        gap = np.array(rollout["response_logprobs"]) - np.array(signal["token_logprob"])
        assert row["length"] == len(rollout["response_token_ids"]) and row["status"] == signal["status"]
        assert row["masked_tokens"] == mask.sum()
        assert row["logprob_gap_mean"] == pytest.approx(gap[mask].mean(), abs=1e-5)
    table = inspect.iterations(evaluated_run)
    assert table["policy"].to_list()[:2] == ["base", "iter-000"]
    base = table.row(0, named=True)
    assert base["rollouts"] == len(rollouts)
    gaps = [(np.array(r["response_logprobs"]) - np.array(s["token_logprob"]), np.array(s["loss_mask"], bool))
            for r, s in zip(rollouts, signals, strict=True) if s["status"] == "ok"]
    masked = np.concatenate([gap[mask] for gap, mask in gaps])
    assert base["sampled_logprob_gap"] == pytest.approx(masked.mean(), abs=1e-5)
    assert base["train_steps"] >= 1


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("RGSD_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (RGSD_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    return found


@pytest.mark.slow
def test_inspect_command_page_in_chromium_and_plot(evaluated_run, tmp_path):
    page, plot = tmp_path / "tokens.html", tmp_path / "run.png"
    out = cli("inspect", evaluated_run, "--iteration", 0, "--top", 5, "--html", page, "--html-rollouts", 3,
              "--plot", plot).stdout
    assert out.count("teacher prefers") == 5
    assert "per policy" in out and "iter-000" in out

    chosen = (inspect.rollouts(evaluated_run, 0).sort("logprob_gap_mean", descending=True, nulls_last=True)
              .head(3).collect())
    tokens = inspect.tokens(evaluated_run, 0).join(chosen.lazy().select("prompt_id", "sample_idx"),
                                                   on=["prompt_id", "sample_idx"]).collect()
    dom = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    assert dom.count(" data-pos=") == tokens.height
    for prompt_id in chosen["prompt_id"]:
        assert prompt_id in dom
    assert "teacher's top tokens" in dom and "student log-prob" in dom

    from matplotlib.image import imread

    image = imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 900 and image[..., :3].std() > 0.05  # drawn, not blank
