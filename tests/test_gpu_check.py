"""`bench/gpu_check.py --dry-run`: the GPU check's steps on a CPU with the tiny model, so that the script cannot rot
before a GPU runs it (`make gpu-check`). Marked long (`make test-long`, which CI runs)."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = [pytest.mark.long, pytest.mark.slow]


def test_the_gpu_check_runs_every_step_on_a_cpu_and_its_numbers_hold(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    assert len(results["iteration_seconds"]) == 3 and results["rollout_tokens_per_s"] > 0
    # fp32 engines beside bf16 autocast: the trainer's log-probs are within the guard's reduced-precision limit
    assert all(0 < gap < 0.1 for gap in results["logprob_gap_per_iteration"])
    assert results["teacher_signals_vllm_vs_hf_max_abs"] < 1e-3  # two fp32 engines over the same tokens
    assert results["sleep_freed_gib"] > 0  # the CPU engine gives its KV cache and weights back
    assert sorted(results["memory"]) == ["0", "1", "2"]
    assert all(set(phases) == {"sampling", "scoring", "training"} for phases in results["memory"].values())
    assert "gpu-check (dry run, cpu" in done.stdout
