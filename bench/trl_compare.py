"""Benchmark: one RGSD epoch of ours against TRL's SDFTTrainer, wall time and peak memory side by side.

    python bench/trl_compare.py [--models builtin:tiny builtin:smollm2-135m-instruct] [--prompts 32]

Both sides get the same model, training prompts (our prepared prompt shards), one sample per prompt,
generation length, temperature, top-k 20 + tail JSD(β=0.5), batch size and number of optimizer steps.
Ours: the `rollout`, `score` and `train` stages as separate processes, as `make iterate` runs them
(model loads included), with the engines of the model's recipe. TRL: `bench/trl_sdft.py` in the bench
environment (.venv-bench: `trl` layered over .venv). Wall time is each side's whole process time; peak
memory is the largest resident set of the process tree (vLLM's engine core included), sampled every
50 ms. Goal: ours <= 0.33x TRL's wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RECIPES = {"builtin:tiny": ("configs/tiny.yaml", ["engine.kind=hf"]),  # vLLM's per-step cost dominates a 1M model
           "builtin:smollm2-135m-instruct": ("configs/smollm2-cpu.yaml", [])}


def run_tree(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak MB of the summed resident memory of the process and its descendants)."""
    import psutil

    started = time.perf_counter()
    with open(log, "a") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    return wall, peak / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(RECIPES))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} is missing: `make bench` builds the bench environment with trl")

    from common import record

    cli = [sys.executable, "-m", "rgsd_pipeline"]
    for model in args.models:
        config, extra = RECIPES.get(model, ("configs/tiny.yaml", [f"model.path={model}", "engine.kind=hf"]))
        with tempfile.TemporaryDirectory() as tmp:
            run, log = Path(tmp) / "run", Path(tmp) / "log.txt"
            overrides = [*extra, f"data.max_prompts={args.prompts}", f"rollout.max_new_tokens={args.tokens}",
                         f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.epochs=1",
                         "rollout.samples_per_prompt=1", "train.save_every=1000"]
            subprocess.run([*cli, "prepare", "--config", config, "--run", str(run), *overrides], cwd=ROOT, check=True,
                           capture_output=True)
            ours_wall, ours_peak = 0.0, 0.0
            for stage in ("rollout", "score", "train"):
                wall, peak = run_tree([*cli, stage, "--run", str(run), "--iteration", "0"], log)
                ours_wall, ours_peak = ours_wall + wall, max(ours_peak, peak)
                print(f"  ours {stage:8s} {wall:7.1f} s  peak {peak:7.0f} MB", flush=True)
            trl_wall, trl_peak = run_tree([str(BENCH_PYTHON), "bench/trl_sdft.py", "--run", str(run),
                                           "--out", str(Path(tmp) / "trl")], log)
            print(f"  TRL SDFTTrainer {trl_wall:7.1f} s  peak {trl_peak:7.0f} MB", flush=True)
            steps = [line for line in log.read_text().splitlines() if line.startswith("TRL_STEPS")]
        record(f"trl_compare/{model}", {
            "prompts": args.prompts, "new_tokens": args.tokens, "optimizer_steps": args.prompts // args.batch,
            "trl_steps": int(steps[-1].split()[1]) if steps else -1,
            "ours_wall_s": ours_wall, "trl_wall_s": trl_wall, "wall_ratio_ours_over_trl": ours_wall / trl_wall,
            "ours_peak_mb": ours_peak, "trl_peak_mb": trl_peak, "peak_ratio_ours_over_trl": ours_peak / trl_peak,
        })


if __name__ == "__main__":
    main()
