"""Benchmark: the resident iterate at 1 and 2 ranks (torchrun, gloo) on this CPU, measured side by side.

    python bench/scale.py                      # tiny model and SmolLM2, 4 iterations x 16 prompts, HF engines
    python bench/scale.py --models tiny        # the tiny model only (a minute)

For each model and rank count: wall time per iteration, the work inside it (sampling + scoring + training
seconds as the steps report them, summed over ranks and divided by the ranks: the time a rank spends
working) and the fixed cost per iteration (the rest: start-up, loads, manifests, checkpoint export, weight
sync, waiting for the other rank). On a 2-core CPU two ranks share the cores, so the ratio says what the
data-parallel path costs in coordination, not what more GPUs would gain.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny": ("configs/tiny.yaml", "builtin:tiny", 64), "smollm2": ("configs/smollm2-cpu.yaml",
                                                                        "builtin:smollm2-135m-instruct", 128)}


def config_file(folder: Path, model: str) -> Path:
    recipe, path, tokens = MODELS[model]
    config = yaml.safe_load((ROOT / recipe).read_text())
    config["model"]["path"] = path
    config["engine"].update(kind="hf", score_kind="hf", hf_batch_size=16)
    config["data"].update(max_prompts=64, rows_per_shard=8, sources=["builtin:medsci"])
    config["rollout"].update(prompts_per_iteration=16, max_new_tokens=tokens)
    config["train"] = {**config.get("train", {}), "batch_size": 16, "micro_batch_size": 4, "save_every": 1}
    out = folder / f"{model}.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def run(config: Path, run_dir: Path, ranks: int, iterations: int) -> tuple[float, float]:
    """(wall seconds, work seconds per rank) of `iterate` over a prepared run."""
    subprocess.run([sys.executable, "-m", "rgsd_pipeline", "prepare", "--config", str(config), "--run", str(run_dir)],
                   cwd=ROOT, check=True, capture_output=True)
    args = ["-m", "rgsd_pipeline", "iterate", "--run-dir", str(run_dir), "--iterations", str(iterations)]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", "29650", *args]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    work = sum(float(s) for s in re.findall(r"(?:sampling|scoring|training) took ([\d.]+) s", result.stdout))
    return wall, work  # the main rank's work: the other rank does the same share


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            config = config_file(Path(tmp), model)
            values = {}
            for ranks in (1, 2):
                wall, work = run(config, Path(tmp) / f"{model}-{ranks}", ranks, args.iterations)
                values[f"{ranks} rank(s): seconds per iteration"] = wall / args.iterations
                values[f"{ranks} rank(s): work per iteration (s)"] = work / args.iterations
                values[f"{ranks} rank(s): fixed cost per iteration (s)"] = (wall - work) / args.iterations
            values["2 ranks / 1 rank, wall time"] = values["2 rank(s): seconds per iteration"] / \
                values["1 rank(s): seconds per iteration"]
            record(f"scale / {model}, {args.iterations} iterations x 16 prompts, HF engines, this CPU", values)


if __name__ == "__main__":
    main()
