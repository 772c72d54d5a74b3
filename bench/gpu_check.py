"""Every GPU path we ship, run once: `make gpu-check` on one H100 or H200 (at most 8 minutes, nothing downloaded).

    python bench/gpu_check.py [--out DIR]     # a GPU: a random Qwen2.5-1.5B-shaped model, bf16 engines
    python bench/gpu_check.py --dry-run       # the same steps on a CPU with builtin:tiny-qwen2 (CI runs it)

One table (and DIR/gpu-check.json):
  - a 3-iteration resident `iterate` at the paper's cadence (one rollout per prompt, one optimizer step an
    iteration), vLLM student, transformers teacher, fp32 master weights, bf16 autocast: the fixed cost of each
    further iteration, what the student engine's sleep gave back, the trainer-vs-engine log-prob gap after each reload,
    each phase's measured memory peak beside the plan, a train step's tokens/s and its MFU against the card's peak;
  - vLLM rollout tokens/s (the rollout stage of the run);
  - the teacher's signals from a vLLM engine against the transformers engine's, on the run's iteration-0 rollouts;
  - TRL's SDFTTrainer at the same shapes where `trl` imports (`make bench` installs it in .venv-bench).

The model is Qwen2.5-1.5B's decoder (28 layers of 1536, GQA 12/2, MLP 8960, tied head) with the built-in tokenizer's
vocabulary in place of 151,936 entries, randomly initialised in-process, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per card
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)


def build_model(out: Path) -> Path:
    """The random 1.5B-shaped Qwen2 model folder (bf16 weights, the built-in tokenizer)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rgsd_pipeline.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **QWEN25_15B)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def overrides(model: str, dry_run: bool) -> list[str]:
    """The recipe: configs/tiny.yaml's bundled data with the qwen recipes' structure, at a size for the card."""
    prompts, tokens = (8, 32) if dry_run else (64, 512)
    return [f"model.path={model}", f"model.dtype={'float32' if dry_run else 'bfloat16'}", "model.max_model_len=1024",
            f"data.max_prompts={3 * prompts}", "data.heldout_fraction=0", f"rollout.prompts_per_iteration={prompts}",
            f"train.batch_size={prompts}", f"train.micro_batch_size={4 if dry_run else 8}",
            f"rollout.max_new_tokens={tokens}", "engine.kind=vllm", "engine.score_kind=hf",
            f"engine.vllm_enforce_eager={'true' if dry_run else 'false'}", "train.bf16=true",
            "train.gradient_checkpointing=true", "train.master_dtype=float32", "train.learning_rate=1e-6"]


def resident_run(run: Path, settings: list[str]) -> tuple[list[float], str]:
    """Seconds of each iteration of a 3-iteration `iterate`, and its output."""
    command = [sys.executable, "-m", "rgsd_pipeline", "iterate", "--config", str(ROOT / "configs/tiny.yaml"),
               "--run-dir", str(run), "--iterations", "3", *settings]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"iterate failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    seconds = [float(s) for s in re.findall(r"iteration \d+ took ([\d.]+) s", done.stdout)]
    return seconds, done.stdout


def run_numbers(run: Path, output: str, parameters: int, checkpointing: bool) -> dict:
    """What the run's own files and summary say: tokens/s, the gap, memory beside the plan, the sleep's bytes."""
    import polars as pl
    import torch

    from rgsd_pipeline import layout
    from rgsd_pipeline.shards import read_stage
    from rgsd_pipeline.training import read_metrics
    from schemas import ROLLOUTS

    rollouts = read_stage(layout.rollouts_dir(run, 0), ROLLOUTS).lazy().collect()
    sampled = rollouts.select(pl.col("response_token_ids").list.len().sum()).item()
    sampling = float(re.search(r"sampling took ([\d.]+) s", output).group(1))
    steps = [line for i in range(3) for line in read_metrics(layout.metrics_file(run, i))]
    tokens_per_s = sum(s["tokens_per_s"] for s in steps[1:]) / max(len(steps) - 1, 1)  # after the first step
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((flops for card, flops in BF16_PEAK_FLOPS.items() if card in name), None)
    flops_per_token = (8 if checkpointing else 6) * parameters
    freed = re.search(r"sleeps gave back ([\d.]+) GiB", output)
    return {
        "device": name,
        "rollout_tokens_per_s": sampled / sampling,
        "train_tokens_per_s": tokens_per_s,
        "train_mfu": tokens_per_s * flops_per_token / peak if peak else None,
        "logprob_gap_per_iteration": [s.get("rollout_logprob_gap_mean") for s in steps],
        "sleep_freed_gib": float(freed.group(1)) if freed else 0.0,
        "memory": {i: json.loads(layout.memory_file(run, i).read_text())["phases"] for i in range(3)},
    }


def signals_gap(run: Path, model: Path, settings_config) -> float:
    """The largest |vLLM - transformers| teacher log-prob of the top-k candidates both list, on iteration 0."""
    import numpy as np

    from rgsd_pipeline import layout
    from rgsd_pipeline.engines import make_engine
    from rgsd_pipeline.models import load_tokenizer
    from rgsd_pipeline.render import chat_ids, teacher_messages
    from rgsd_pipeline.shards import read_stage
    from schemas import PROMPTS, ROLLOUTS

    config = settings_config
    tokenizer = load_tokenizer(model)
    prompts = {p["prompt_id"]: p for p in read_stage(layout.prompts_dir(run), PROMPTS).lazy().collect().to_dicts()}
    rows = read_stage(layout.rollouts_dir(run, 0), ROLLOUTS).lazy().collect().to_dicts()
    teacher_ids = [chat_ids(tokenizer, teacher_messages(prompts[r["prompt_id"]], config.template)) for r in rows]
    sequences = [t + r["response_token_ids"] for t, r in zip(teacher_ids, rows, strict=True)]
    lens = [len(t) for t in teacher_ids]
    scored = {}
    for kind in ("hf", "vllm"):
        engine = make_engine(kind, model, config.engine, config.model, max_logprobs=config.score.top_k)
        scored[kind] = engine.score(sequences, lens, config.score.top_k)
        engine.close()
    gap = 0.0
    for hf, vllm in zip(scored["hf"], scored["vllm"], strict=True):
        gap = max(gap, float(np.abs(hf.token_logprob_T - vllm.token_logprob_T).max(initial=0.0)))
    return gap


def trl_comparison(run: Path, ours_seconds: float) -> dict:
    """TRL's SDFTTrainer over the same prompts (bench/trl_sdft.py), where trl imports here."""
    if importlib.util.find_spec("trl") is None:
        return {"trl": "not run: trl does not import in this environment (make bench puts it in .venv-bench)"}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench/trl_sdft.py"), "--run", str(run), "--out",
                    tempfile.mkdtemp(prefix="gpu-check-trl-")], check=True, cwd=ROOT)
    trl_seconds = time.perf_counter() - started
    return {"trl_seconds": trl_seconds, "ours_over_trl": ours_seconds / trl_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on a CPU with builtin:tiny-qwen2")
    parser.add_argument("--out", type=Path, default=None, help="where the run and gpu-check.json go (a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.memory_plan import Shape
    from rgsd_pipeline.models import resolve_model

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run `python bench/gpu_check.py --dry-run` on a CPU")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model("builtin:tiny-qwen2") if args.dry_run else build_model(out / "model")
    settings = overrides(str(model), args.dry_run)
    config = load_config(str(ROOT / "configs/tiny.yaml"), settings)
    parameters = Shape.of(model).parameters
    seconds, output = resident_run(out / "run", settings)
    results = {"model_parameters": parameters, "iteration_seconds": seconds,
               "fixed_cost_per_further_iteration_s": sum(seconds[1:]) / max(len(seconds) - 1, 1),
               **run_numbers(out / "run", output, parameters, config.train.gradient_checkpointing),
               "teacher_signals_vllm_vs_hf_max_abs": signals_gap(out / "run", model, config),
               **trl_comparison(out / "run", sum(seconds))}
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"gpu-check ({'dry run, ' if args.dry_run else ''}{results['device']}, {parameters / 1e9:.2f}B parameters)")
    for key, value in results.items():
        if key != "memory":
            print(f"  {key:38s} {value}")
    for iteration, phases in results["memory"].items():
        print(f"  memory, iteration {iteration}: " + ", ".join(
            f"{phase} {p['measured_bytes'] / 2**30:.2f} GiB (plan {p['planned_bytes'] / 2**30:.2f})"
            for phase, p in phases.items()))
    print(f"  written: {out / 'gpu-check.json'}")


if __name__ == "__main__":
    main()
