"""The Slurm launch scripts, run by bash with `rgsd-pipeline` replaced by a stub that records how it was started."""

import os
import stat
import subprocess

from helpers import ROOT


def test_teacher_replicas_bind_the_cluster_address_and_require_a_key_only_you_can_read(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "rgsd-pipeline"
    stub.write_text('#!/bin/bash\necho "$CUDA_VISIBLE_DEVICES|$VLLM_API_KEY|$*" >> "$STUB_LOG"\n')
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "SLURM_GPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "7"}
    env.pop("TEACHER_HOST", None)
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "teacher.sbatch"), "runs/x"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    key_file = tmp_path / "rgsd-teacher-7.key"
    key = key_file.read_text().strip()
    assert len(key) == 64 and int(key, 16) and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    host = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    calls = sorted(line.split("|") for line in log.read_text().splitlines())
    assert [gpu for gpu, _, _ in calls] == ["0", "1"]
    for gpu, given_key, args in calls:  # the old script passed neither: every interface, no key
        assert given_key == key and key not in args
        assert f"--host {host} --port {8000 + int(gpu)}" in args, args
    assert all(args.startswith("serve-teacher --run runs/x") for _, _, args in calls)
