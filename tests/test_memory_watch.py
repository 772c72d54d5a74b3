"""The memory guard: a phase's measured peak beside the plan's estimate, a warning naming the part when over."""

import json
import subprocess
import sys

from rgsd_pipeline import layout, memory_watch
from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.distributed import World
from rgsd_pipeline.models import resolve_model


def test_a_cpu_phase_peak_counts_what_the_phase_allocated_and_released():
    """VmHWM is reset at the phase's start: a 512 MiB tensor made and freed inside the phase is in its peak, though
    the resident set is back down when the phase ends (in a fresh process: one that ran other tests may hold freed
    memory that the tensor reuses)."""
    code = """
import torch
from rgsd_pipeline import memory_watch
watch = memory_watch.MemoryWatch.__new__(memory_watch.MemoryWatch)
watch.measured = {}
before = memory_watch.resident_bytes()
with watch.phase("train"):
    block = torch.ones(128 << 20)  # 512 MiB, every page touched
    del block
print(watch.measured["training"] - before, memory_watch.resident_bytes() - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_growth, end_growth = map(int, done.stdout.split())
    assert peak_growth > 450 << 20 and end_growth < 100 << 20


def test_a_phase_over_its_estimate_warns_naming_the_largest_part_and_is_kept_in_the_run(tmp_path, capsys):
    config = RunConfig()
    watch = memory_watch.MemoryWatch(tmp_path, config, World(), resolve_model("builtin:tiny"))
    layout.iteration_dir(tmp_path, 0).mkdir(parents=True)
    planned = watch.estimate("scoring")
    watch.measured = {"sampling": watch.estimate("sampling"), "scoring": planned + 2 * memory_watch.SLACK + planned}
    record = watch.finish_iteration(0)
    out = capsys.readouterr()
    assert "scoring peak" in out.err and "'teacher" in out.err and "sampling peak" not in out.err
    assert "memory per process, iteration 0: sampling" in out.out
    kept = json.loads(layout.memory_file(tmp_path, 0).read_text())
    assert kept == record and kept["phases"]["scoring"]["planned_bytes"] == planned
    assert "training" not in kept["phases"]  # a phase that did not run is not reported
    assert watch.finish_iteration(1) is None  # nothing measured since


def test_where_freed_memory_is_kept_a_phase_is_held_to_the_largest_estimate_so_far():
    watch = memory_watch.MemoryWatch.__new__(memory_watch.MemoryWatch)
    watch.parts = {"sampling_peak": 5, "scoring_peak": 3, "training_peak": 4}
    watch.kept = True
    assert [watch.estimate(p) for p in ("sampling", "scoring", "training")] == [5, 5, 5]
    watch.kept = False
    assert [watch.estimate(p) for p in ("sampling", "scoring", "training")] == [5, 3, 4]
