"""The learning benchmark end to end, in its one-iteration version on the tiny model."""

import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.long
def test_the_learning_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path):
    command = [sys.executable, "bench/learning.py", "--quick", "--arms", "rubric,placebo,grpo", "--out",
               str(tmp_path / "figures"), "--runs", str(tmp_path / "runs")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (tmp_path / "figures" / "learning.md").read_text().splitlines()
    assert table[0].startswith("| policy | teacher | rubric satisfaction [95% CI] | − base, paired [95% CI] | "
                               "− raw-rubric arm, paired [95% CI] | on builtin:howto's criteria [95% CI] | on ")
    assert "| medical |" in table[0]
    assert "kind:" not in table[0] and "| leakage |" in table[0] and "clinician" in table[0]
    rows = [line.split(" | ")[:2] for line in table[2:]]
    assert rows == [["| base", "rubric"], ["| teacher", "rubric"], ["| iter-000", "rubric"], ["| iter-000", "placebo"],
                    ["| iter-000", "grpo"]]
    assert table[0].rstrip(" |").endswith("rollouts | judge calls")
    costs = {line.split(" | ")[1]: line.rstrip(" |").split(" | ")[-2:] for line in table[4:]}
    assert costs == {"rubric": ["8", "0"], "placebo": ["8", "0"], "grpo": ["32", "192"]}  # 32 rollouts x 6 criteria
    assert (tmp_path / "figures" / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in ("rubric", "placebo", "grpo"):
        assert (tmp_path / "runs" / arm / "eval" / "heldout" / "iter-000" / "summary-rules.json").exists()
    # The placebo's teacher read the student's view: its signals are float32 and its training divergence tiny.
    placebo = (tmp_path / "runs" / "placebo" / "run.yaml").read_text()
    assert "teacher: student" in placebo and "value_dtype: float32" in placebo
