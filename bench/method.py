"""Benchmark: the method's knobs on SmolLM2-135M-Instruct, same data and seeds throughout.

    python bench/method.py [--prompts 48] [--per-iteration 16] [--skip cadence|clip]

(a) cadence: held-out JSD after each of 3 iterations of 16 prompts (the paper's cadence: small on-policy
    iterations, one schedule and AdamW state across them) against 1 iteration of the same 48 prompts;
(b) clip: from one set of iteration-0 rollouts and signals, one iteration trained with each clip mode
    (none, token, entry, soft); held-out JSD after it, and the share of loss positions whose hidden state
    gets a non-zero gradient on those signals (measured with autograd on the base model).

Held-out JSD: the policy samples the run's held-out prompts (fixed seeds, the recipe's sampling), the
rubric-conditioned teacher scores the samples, mean JSD(0.5) per token over top-20 + tail.
Everything runs through the `rgsd-pipeline` stage commands except the held-out measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "rgsd_pipeline"]
CONFIG = "configs/smollm2-cpu.yaml"


def cli(*args) -> str:
    result = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"rgsd-pipeline {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def heldout_jsd(run: Path, policy: Path) -> float:
    """Mean per-token teacher-policy JSD on the policy's own samples of the held-out prompts."""
    import polars as pl

    from rgsd_pipeline import layout
    from rgsd_pipeline.diagnostics import heldout_divergence
    from rgsd_pipeline.engines.hf_engine import HfEngine
    from rgsd_pipeline.models import resolve_model
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.sampling import EVAL_SEED_ROUND, sample_seed
    from rgsd_pipeline.shards import read_stage
    from schemas import PROMPTS

    config = load_run_config(run)
    held = read_stage(layout.prompts_dir(run), PROMPTS).lazy().filter(pl.col("split") == "heldout").collect().to_dicts()
    teacher = HfEngine(resolve_model(config.model), config.engine, config.model)
    student = HfEngine(policy, config.engine, config.model)
    teacher.batch_size = student.batch_size = len(held)
    seeds = [sample_seed(config.rollout.seed, p["prompt_id"], 0, seed_round=EVAL_SEED_ROUND) for p in held]
    return heldout_divergence(student, teacher, held, config, seeds, config.score.top_k, config.train.beta).divergence


def gradient_share(run: Path, clip: str) -> float:
    """Share of the loss positions of iteration 0's signals whose hidden state gets a non-zero gradient."""
    import torch

    from rgsd_pipeline import layout
    from rgsd_pipeline.distill import LossSpec, distill_loss
    from rgsd_pipeline.examples import collate, load_examples
    from rgsd_pipeline.models import load_model, load_tokenizer, resolve_model
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.shards import read_stage
    from rgsd_pipeline.signals import storage_schema
    from schemas import ROLLOUTS

    config = load_run_config(run)
    base = resolve_model(config.model)
    rollouts = read_stage(layout.rollouts_dir(run, 0), ROLLOUTS)
    signals = read_stage(layout.signals_dir(run, 0), storage_schema(config.score, len(load_tokenizer(base))))
    examples = load_examples(rollouts, signals)
    model = load_model(base)
    spec = LossSpec(clip=clip, tau=config.train.tau, beta=config.train.beta)
    reached = total = 0
    for lo in range(0, len(examples), 4):
        batch = examples[lo:lo + 4]
        micro = collate(batch, list(range(len(batch))), "token", 1, len(batch), 0)
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=micro.input_ids_B_T,
                                         attention_mask=micro.attention_mask_B_T).last_hidden_state
        hidden_N_H = hidden[micro.rows_N, micro.columns_N].detach().requires_grad_(True)
        loss, _, _ = distill_loss(hidden_N_H, model.get_output_embeddings(), micro.targets, spec)
        (grad_N_H,) = torch.autograd.grad(loss, hidden_N_H)
        reached += int((grad_N_H.abs().sum(-1) > 0).sum())
        total += grad_N_H.shape[0]
    return reached / total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--per-iteration", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    from common import record

    iterations = args.prompts // args.per_iteration
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "cadence" not in args.skip:
            # (a) The same 48 prompts as one iteration, or as 3 on-policy iterations of 16.
            common = [f"data.max_prompts={args.prompts}"]
            big, small = tmp / "one-iteration", tmp / "cadence"
            cli("iterate", "--config", CONFIG, "--run", big, "--iterations", 1, *common)
            cli("iterate", "--config", CONFIG, "--run", small, "--iterations", iterations, *common,
                f"rollout.prompts_per_iteration={args.per_iteration}")
            from rgsd_pipeline.models import resolve_model

            values = {"base": heldout_jsd(big, resolve_model("builtin:smollm2-135m-instruct")),
                      f"1 x {args.prompts} prompts": heldout_jsd(big, big / "iter-000" / "checkpoint")}
            for i in range(iterations):
                values[f"{args.per_iteration} prompts/iteration, after iteration {i + 1}"] = heldout_jsd(
                    small, small / f"iter-{i:03d}" / "checkpoint")
            record("method cadence / SmolLM2 held-out JSD", values)

        if "clip" not in args.skip:
            # (b) One set of rollouts and signals; one iteration trained per clip mode.
            scored = tmp / "scored"
            cli("prepare", "--config", CONFIG, "--run", scored, f"data.max_prompts={args.prompts}")
            cli("rollout", "--run", scored, "--iteration", 0)
            cli("score", "--run", scored, "--iteration", 0)
            values = {}
            for clip in ("none", "token", "entry", "soft"):
                run = tmp / f"clip-{clip}"
                shutil.copytree(scored, run)
                frozen = (run / "run.yaml").read_text()
                (run / "run.yaml").write_text(frozen.replace("  clip: entry", f"  clip: {clip}", 1))
                cli("train", "--run", run, "--iteration", 0)
                values[f"{clip}: held-out JSD"] = heldout_jsd(run, run / "iter-000" / "checkpoint")
                values[f"{clip}: share of positions with gradient"] = gradient_share(scored, clip)
            record("method clip / SmolLM2, one iteration", values)


if __name__ == "__main__":
    main()
