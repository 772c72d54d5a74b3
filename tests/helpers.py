"""Helpers shared by the end-to-end tests: run the real CLI, kill a stage mid-way."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
CLI = [sys.executable, "-m", "rgsd_pipeline"]


def cli(*args, check=True):
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=os.environ)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def kill_after_first_shard(args, output_dir: Path, timeout: float = 180) -> int:
    """Start a stage, SIGKILL it as soon as it has published one shard; return how many shards were done."""
    progress = Path(output_dir) / ".progress"
    worker = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and worker.poll() is None and not list(progress.glob("part-*.json")):
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    return len(list(progress.glob("part-*.json")))


def copy_prepared(source_run: Path, target_run: Path) -> Path:
    """A new run folder holding only `source_run`'s frozen config and prompts: ready for iteration 0's rollout."""
    import shutil

    shutil.copytree(Path(source_run) / "prompts", Path(target_run) / "prompts")
    shutil.copy(Path(source_run) / "run.yaml", Path(target_run) / "run.yaml")
    return Path(target_run)
