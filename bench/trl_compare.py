"""Benchmark: our iterations against TRL's SDFTTrainer (online self-distillation), at the same cadence and work.

    python bench/trl_compare.py [--model builtin:smollm2-135m-instruct] [--tokens 128] [--batch 16]

Two workloads, each on the same prepared prompts, one sample per prompt, the same generation length and
sampling, top-20 + tail JSD(0.5), batch, optimizer steps, fp32, no gradient checkpointing:

- cadence: 4 iterations x 16 prompts: ours one iteration per optimizer step (rollout.prompts_per_iteration =
  batch), TRL one online step per batch;
- pass: 96 prompts: ours as one iteration of 6 optimizer steps, and as 6 iterations of one step; TRL 6 steps.

Ours runs as the resident `rgsd-pipeline iterate` (one process, engines kept) and, for the fixed-cost
comparison, as `iterate --per-stage` (one process per stage). TRL runs bench/trl_sdft.py in the bench
environment (.venv-bench). Wall time is each whole process tree from launch; peak memory the largest
summed resident set size of the tree, sampled every 100 ms (run_tree). Each side's time is
split into generation, teacher scoring, update, and the rest (fixed: imports, model loads, engine starts,
process starts) from the seconds each side reports. Goals: ours <= 0.8x TRL's wall time, peak memory <= 1x,
and <= 2 s of fixed cost per further resident iteration (fixed_s_per_further_iteration: what an iteration after
the first takes beyond its steps' work). At the cadence TRL
also runs once with glibc's malloc set as our commands set it (rgsd_pipeline/allocator.py): what that setting
alone is worth to a peer.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
CLI = [sys.executable, "-m", "rgsd_pipeline"]
# What rgsd_pipeline/allocator.py asks of glibc at run time, as glibc's environment variables for another program
GLIBC_KEEPS_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
RECIPES = {"builtin:tiny": ("configs/tiny.yaml", ["engine.kind=hf"]),
           "builtin:smollm2-135m-instruct": ("configs/smollm2-cpu.yaml", ["engine.vllm_cpu_kvcache_gib=1"])}


def run_tree(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float, dict, str]:
    """(wall seconds, peak MB of the process tree's memory, each process's MB at that peak by name, its output).

    Memory is the resident set size summed over the tree's processes, sampled every 100 ms from the kernel's
    counters (/proc/PID/statm). Not the proportional set size: reading that walks every page table of the process
    under its memory-map lock, and sampling it every 100 ms made our multi-GB processes up to 40% slower (glibc's
    mmap and munmap wait for the walk). Pages that several processes share are counted once per process, an
    overcount only where a side runs several at once (vLLM's own worker processes, engine.vllm_cpu_in_process=false)."""
    import psutil

    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        root, peak, parts = psutil.Process(process.pid), 0, {}
        while process.poll() is None:
            try:
                tree = {p.pid: (p.name(), p.memory_info().rss)
                        for p in [root, *root.children(recursive=True)] if p.is_running()}
                total = sum(rss for _, rss in tree.values())
                if total > peak:
                    peak, parts = total, {}
                    for name, rss in tree.values():
                        parts[name] = parts.get(name, 0) + round(rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)
    wall = time.perf_counter() - started
    if process.returncode:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); the end of {log}:\n{tail}")
    return wall, peak / 2**20, parts, log.read_text()


def ours_split(output: str, wall: float) -> dict:
    """Generation, teacher and update seconds our steps reported; the rest of the wall time is fixed cost. For the
    resident run also the part of it inside the iteration loop (`in_loop_fixed_s`: the stages' own time less their
    work and the one engine start: checkpoint export, weight reload, reading inputs, writing manifests), which is
    what each further iteration costs beyond its work; the rest is paid once (process start, imports, engine
    start, the last trainer state's write)."""
    work = {name: sum(float(s) for s in re.findall(rf"{name} took ([\d.]+) s", output))
            for name in ("sampling", "scoring", "training")}
    split = {"generation_s": work["sampling"], "teacher_s": work["scoring"], "update_s": work["training"],
             "fixed_s": wall - sum(work.values())}
    resident = re.search(r"in this process: (.*); engines started once \(([\d.]+) s\)", output)
    if resident:
        stages = sum(float(s) for s in re.findall(r"[a-z]+ ([\d.]+) s", resident.group(1)))
        split["in_loop_fixed_s"] = stages - float(resident.group(2)) - sum(work.values())
        split["engine_start_s"] = float(resident.group(2))
        further = further_iterations_fixed(output)
        if further:
            split["fixed_s_each_further_iteration"] = further
            split["fixed_s_per_further_iteration"] = sum(further) / len(further)
    return split


def further_iterations_fixed(output: str) -> list[float]:
    """For each resident iteration after the first (`iteration N took S s`), its seconds less its steps' work: what
    one more iteration costs beyond sampling, scoring and training (export, weight load, reading inputs, manifests).
    The first iteration also pays one-off costs (imports, tokenizer loads), like the engines' start."""
    fixed, work = [], 0.0
    for line in output.splitlines():
        if took := re.search(r"(?:sampling|scoring|training) took ([\d.]+) s", line):
            work += float(took.group(1))
        elif iteration := re.search(r"(?:^|\r)iteration (\d+) took ([\d.]+) s", line):
            if int(iteration.group(1)) > 0:
                fixed.append(round(float(iteration.group(2)) - work, 2))
            work = 0.0
    return fixed


def trl_split(output: str, wall: float) -> dict:
    generation, rest = map(float, re.search(r"TRL_SECONDS generation=([\d.]+) teacher_and_update=([\d.]+)",
                                            output).groups())
    return {"generation_s": generation, "teacher_and_update_s": rest, "fixed_s": wall - generation - rest}


def prepared(tmp: Path, model: str, prompts: int, tokens: int, batch: int, per_iteration: int) -> Path:
    config, extra = RECIPES.get(model, ("configs/tiny.yaml", [f"model.path={model}", "engine.kind=hf"]))
    run = tmp / f"run-{prompts}-{per_iteration}-{time.monotonic_ns()}"
    overrides = [*extra, f"data.max_prompts={prompts}", f"rollout.max_new_tokens={tokens}",
                 f"train.batch_size={batch}", f"train.micro_batch_size={min(batch, 8)}", "train.epochs=1",
                 "rollout.samples_per_prompt=1", "train.save_every=1000", "train.gradient_checkpointing=false",
                 f"rollout.prompts_per_iteration={per_iteration}", "data.rows_per_shard=1000"]
    subprocess.run([*CLI, "prepare", "--config", config, "--run", str(run), *overrides], cwd=ROOT, check=True,
                   capture_output=True)
    return run


def compare(model: str, prompts: int, per_iteration: int, tokens: int, batch: int, per_stage: bool, tmp: Path,
            trl_kept_memory: bool = False) -> dict:
    """Both sides on the same prepared prompts. `trl_kept_memory`: TRL once more, with glibc's malloc set as our
    commands set it (rgsd_pipeline/allocator.py, through glibc's environment variables), to show what that setting
    alone is worth to a peer."""
    iterations = -(-prompts // per_iteration) if per_iteration else 1
    values = {"prompts": prompts, "prompts_per_iteration": per_iteration or prompts, "iterations": iterations,
              "new_tokens": tokens, "optimizer_steps": -(-prompts // batch)}
    sides = [("ours", False)] + ([("ours_per_stage", True)] if per_stage else [])
    for name, staged in sides:
        run = prepared(tmp, model, prompts, tokens, batch, per_iteration)
        wall, peak, parts, output = run_tree([*CLI, "iterate", "--run", str(run), "--iterations", str(iterations),
                                              *(["--per-stage"] if staged else [])], tmp / f"{name}.log")
        values.update({f"{name}_wall_s": wall, f"{name}_peak_mb": peak, f"{name}_peak_parts_mb": parts,
                       **{f"{name}_{k}": v for k, v in ours_split(output, wall).items()}})
        values[f"{name}_fixed_s_per_iteration"] = values[f"{name}_fixed_s"] / iterations
        if f"{name}_in_loop_fixed_s" in values:
            values[f"{name}_in_loop_fixed_s_per_iteration"] = values[f"{name}_in_loop_fixed_s"] / iterations
        print(f"  {name:15s} {wall:7.1f} s  peak {peak:6.0f} MB {parts}", flush=True)
    run = prepared(tmp, model, prompts, tokens, batch, per_iteration)
    wall, peak, parts, output = run_tree([str(BENCH_PYTHON), "bench/trl_sdft.py", "--run", str(run), "--out",
                                          str(tmp / "trl")], tmp / "trl.log")
    steps = int(re.search(r"TRL_STEPS (\d+)", output).group(1))
    values.update({"trl_wall_s": wall, "trl_peak_mb": peak, "trl_peak_parts_mb": parts, "trl_steps": steps,
                   **{f"trl_{k}": v for k, v in trl_split(output, wall).items()}})
    print(f"  {'TRL SDFTTrainer':15s} {wall:7.1f} s  peak {peak:6.0f} MB {parts}", flush=True)
    values["wall_ratio_ours_over_trl"] = values["ours_wall_s"] / wall
    values["peak_ratio_ours_over_trl"] = values["ours_peak_mb"] / peak
    if trl_kept_memory:
        run = prepared(tmp, model, prompts, tokens, batch, per_iteration)
        wall, peak, _, output = run_tree([str(BENCH_PYTHON), "bench/trl_sdft.py", "--run", str(run), "--out",
                                          str(tmp / "trl-kept")], tmp / "trl-kept.log", env=GLIBC_KEEPS_FREED_MEMORY)
        values.update({"trl_kept_memory_wall_s": wall, "trl_kept_memory_peak_mb": peak,
                       **{f"trl_kept_memory_{k}": v for k, v in trl_split(output, wall).items()},
                       "wall_ratio_ours_over_trl_kept_memory": values["ours_wall_s"] / wall})
        print(f"  {'TRL, kept memory':15s} {wall:7.1f} s  peak {peak:6.0f} MB", flush=True)
    return values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-pass", action="store_true", help="only the 4 x 16 cadence workload")
    parser.add_argument("--skip-cadence", action="store_true", help="only the 96-prompt pass workloads")
    args = parser.parse_args()
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} is missing: `make bench` builds the bench environment with trl")
    from common import record

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_cadence:
            print(f"cadence: 4 iterations x {args.batch} prompts x {args.tokens} tokens, {args.model}")
            record(f"trl_compare cadence 4x{args.batch} / {args.model}",
                   compare(args.model, 4 * args.batch, args.batch, args.tokens, args.batch, True, tmp,
                           trl_kept_memory=True))
        if not args.skip_pass:
            print(f"pass: 96 prompts x {args.tokens} tokens as one iteration, {args.model}")
            record(f"trl_compare pass 96, one iteration / {args.model}",
                   compare(args.model, 96, 0, args.tokens, args.batch, False, tmp))
            print(f"pass: 96 prompts x {args.tokens} tokens as iterations of {args.batch}, {args.model}")
            record(f"trl_compare pass 96, iterations of {args.batch} / {args.model}",
                   compare(args.model, 96, args.batch, args.tokens, args.batch, False, tmp))


if __name__ == "__main__":
    main()
