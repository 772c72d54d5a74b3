"""Shared pieces of the benchmarks: prompts from the bundled data, timing, peak memory in a child process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results.json"


def timed(fn):
    """(result, seconds) of one call."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def peak_memory_mb(code: str) -> float:
    """Peak memory (MB) of a fresh Python process running `code`: CUDA allocations when the code prints
    CUDA_PEAK, else resident memory (the process's own baseline included)."""
    # VmHWM, not ru_maxrss: Linux children inherit the parent's ru_maxrss, so a large parent masks them.
    wrapper = code + "\nprint('PEAK', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True).stdout
    if "CUDA_PEAK" in out:
        return int(out.split("CUDA_PEAK", 1)[1].split()[0]) / 2**20
    return int(out.rsplit("PEAK", 1)[1]) / 1024


def record(section: str, values: dict) -> None:
    """Merge one benchmark's numbers into bench/results.json and print them."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = values
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(k) for k in values)
    print(f"\n== {section}")
    for key, value in values.items():
        print(f"  {key:{width}s}  {value:.3f}" if isinstance(value, float) else f"  {key:{width}s}  {value}")


def self_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GivenEngine:
    """An engine host (engines.hosting) that hands out one engine built beforehand and never closes it, so that a
    step is timed without the engine's start, like the bare call it is compared with."""

    resident = True

    def __init__(self, engine):
        self.engine = engine

    def student(self, policy, config):
        return self.engine

    def teacher(self, teacher, config):
        return self.engine

    def done(self, engine):
        pass
