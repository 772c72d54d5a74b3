"""The allocator setting every command makes (rgsd_pipeline/allocator.py): freed memory stays for reuse."""

import os
import subprocess
import sys

import pytest

# A child process: 512 MB allocated, touched and freed; prints its resident set before and after the free, in MB.
CHILD = """
import psutil
from rgsd_pipeline.allocator import keep_freed_memory
kept = keep_freed_memory()
process = psutil.Process()
block = bytearray(512 << 20)
before = process.memory_info().rss >> 20
del block
after = process.memory_info().rss >> 20
print(kept, before, after)
"""


def resident_after_free(keep: str) -> tuple[bool, int, int]:
    env = {**os.environ, "RGSD_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    kept, before, after = out.split()
    return kept == "True", int(before), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_stays_for_the_next_allocation_unless_turned_off():
    kept, before, after = resident_after_free("1")
    assert kept and after > before - 16  # the 512 MB stay in the heap, ready for reuse
    kept, before, after = resident_after_free("0")
    assert not kept and after < before - 480  # glibc's default: the block's own mapping is returned on free


def test_a_gpu_node_keeps_glibcs_defaults_unless_asked(monkeypatch, tmp_path):
    """Measured on CPUs only: on a machine with a GPU driver the setting stays off (the host memory it would keep is
    the gathered checkpoint and vLLM's offloaded weights), unless RGSD_KEEP_FREED_MEMORY=1 asks for it."""
    from rgsd_pipeline import allocator

    settings = []

    class Libc:
        def mallopt(self, parameter, value):
            settings.append(parameter)
            return 1

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(allocator, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia0"),))
    monkeypatch.delenv("RGSD_KEEP_FREED_MEMORY", raising=False)
    assert not allocator.has_gpu()
    assert allocator.keep_freed_memory() is sys.platform.startswith("linux")  # a CPU machine: on
    (tmp_path / "nvidia0").touch()
    settings.clear()
    assert allocator.has_gpu() and allocator.keep_freed_memory() is False and settings == []
    monkeypatch.setenv("RGSD_KEEP_FREED_MEMORY", "1")
    assert allocator.keep_freed_memory() is sys.platform.startswith("linux")
