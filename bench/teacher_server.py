"""Benchmark: scoring with the local HF teacher against one and two `vllm serve` replicas (the teacher service).

    python bench/teacher_server.py                 # SmolLM2, 32 rollouts of up to 128 tokens, on this CPU

The same rollouts are scored three ways with `rgsd-pipeline score` (the time is the stage's own "scoring took",
engine start excluded): the local transformers engine, engine.score_kind=server over one replica, and over two.
Agreement is the largest |Δ log-prob| between the local and the served signals (stored as float32 here). On a
2-core CPU two replicas share the cores the local engine has alone: the ratio says what serving costs on one
machine, not what more GPUs gain.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import record  # noqa: E402
from helpers import ROOT, VllmServer  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"


def cli(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "rgsd_pipeline", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return result.stdout


def scoring_seconds(run: Path, *overrides: str) -> float:
    import yaml

    config = yaml.safe_load((run / "run.yaml").read_text())
    for text in overrides:
        key, _, value = text.partition("=")
        section, field = key.split(".")
        config[section][field] = yaml.safe_load(value)
    (run / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(run / "iter-000" / "signals", ignore_errors=True)
    out = cli("score", "--run", run, "--iteration", 0)
    return float(re.search(r"scoring took ([\d.]+) s", out).group(1))


def token_logprobs(run: Path) -> np.ndarray:
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.shards import read_stage
    from rgsd_pipeline.signals import storage_schema

    schema = storage_schema(load_run_config(run).score, 49152)
    frame = read_stage(run / "iter-000" / "signals", schema).lazy().collect()
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in frame["token_logprob"].to_list()])


def main():
    from rgsd_pipeline.models import resolve_model

    path = resolve_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        cli("prepare", "--config", "configs/smollm2-cpu.yaml", "--run", run, "data.max_prompts=32",
            "rollout.max_new_tokens=128", "score.value_dtype=float32", "engine.kind=auto")
        cli("rollout", "--run", run, "--iteration", 0)
        local_s = scoring_seconds(run, "engine.score_kind=hf")
        local = token_logprobs(run)
        values = {"local HF engine: scoring seconds": local_s}
        servers = [VllmServer(path, "teacher", tmp / f"serve-{i}.log", "--max-logprobs", "20", "--max-model-len",
                              "2048") for i in range(2)]
        try:
            for replicas in (1, 2):
                for server in servers[:replicas]:
                    if server.process is None:
                        server.start()
                urls = "[" + ", ".join(s.url for s in servers[:replicas]) + "]"
                seconds = scoring_seconds(run, "engine.score_kind=server", f"engine.teacher_urls={urls}")
                served = token_logprobs(run)
                values[f"{replicas} vllm serve replica(s): scoring seconds"] = seconds
                values[f"{replicas} replica(s) / local, scoring time"] = seconds / local_s
                values[f"{replicas} replica(s): max |Δ log-prob| against local"] = float(np.abs(served - local).max())
        finally:
            for server in servers:
                server.stop()
        record("teacher service / SmolLM2, 32 rollouts x 128 tokens, this CPU", values)


if __name__ == "__main__":
    main()
