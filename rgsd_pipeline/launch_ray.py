"""Ray clusters: the resident `iterate`'s ranks as Ray Train workers (`iterate --ray ADDRESS --workers N`).

Ray Train's `TorchTrainer` starts N worker processes, sets RANK / WORLD_SIZE / LOCAL_RANK and joins them
in a torch process group (gloo on CPUs, nccl on GPUs); each worker then runs the same rank function as
under torchrun (resident.run_iterations), which neither knows nor cares who started it. The run folder
must be on storage every worker sees (a shared file system), as for Slurm. Ray is started or joined once
per run, never per iteration. Install with the `ray` extra (`ray[train]`; never `ray[llm]`, which pins an
older vLLM).

`--ray local` is a cluster of this machine alone that nothing else can reach: Ray's own listeners are given
the loopback address, its token auth stays on, and the workers join their process group through a file
store rather than TorchTrainer's rendezvous, whose TCP store listens on every interface whatever address it
is given; gloo and nccl are pinned to the loopback interface.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from rgsd_pipeline import layout
from rgsd_pipeline.distributed import collective_timeout
from rgsd_pipeline.errors import UserError

# A cluster of this machine alone: no usage report, and token auth on (a user may set RAY_AUTH_MODE=disabled) with
# a token made for this run and handed to Ray's processes in their environment, so none is written to ~/.ray.
# Its listeners are bound to loopback by the node address given to ray.init (GCS, raylet, object manager, agents,
# workers); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from replacing 127.0.0.1 by the machine's address.
LOCAL_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                     "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
LOOPBACK = "127.0.0.1"


class RayError(UserError, RuntimeError):
    """Ray is missing, unreachable, or a worker failed; the message names the rank and what to do."""


def rank_main(settings: dict) -> None:
    """One Ray Train worker: the resident rank function on the process group Ray set up (or, on a local cluster,
    on one joined through the file store `settings["store"]`)."""
    from rgsd_pipeline.distributed import init_world
    from rgsd_pipeline.resident import quiet_unless_main, run_iterations

    if settings.get("store"):
        join_through_file(settings["store"])
    world = init_world()
    with quiet_unless_main(world):
        run_iterations(Path(settings["run"]), settings["iterations"], settings["engine_kind"], world)
    world.barrier()


def join_through_file(store: str) -> None:
    """Join this worker's process group through the file store at `store` (every worker on this machine), with the
    rank and world Ray Train gave it; a worker that sees only its own GPU uses it as GPU 0."""
    import ray.train
    import torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, size, local = context.get_world_rank(), context.get_world_size(), context.get_local_rank()
    gpus = torch.cuda.device_count()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local if local < gpus else 0),
                      LOCAL_WORLD_SIZE=str(context.get_local_world_size()))
    if gpus:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if gpus else "gloo", store=dist.FileStore(store, size), rank=rank,
                            world_size=size, timeout=collective_timeout())


def run_on_ray(address: str, run: Path, iterations: int, engine_kind: str | None, workers: int,
               gpus_per_worker: float, cpus_per_worker: float) -> None:
    """Run the resident iterations as `workers` Ray Train workers on the cluster at `address` (auto, host:port, or
    local: start a cluster of this machine alone, bound to 127.0.0.1, stopped at the end)."""
    local = address == "local"
    if local:
        for key, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)
        if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:
        raise RayError("--ray needs Ray Train: pip install 'rgsd-pipeline[ray]'") from None

    store_dir = tempfile.mkdtemp(prefix="rgsd-ray-") if local else None
    if local:
        ray.init(num_cpus=max(int(workers * cpus_per_worker) + 1, 2), include_dashboard=False,
                 object_store_memory=200_000_000, log_to_driver=True, _node_ip_address=LOOPBACK)
    else:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            raise RayError(f"cannot reach the Ray cluster at {address}: {err}; start it (`ray start --head`) or "
                           "use --ray local") from None
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    settings = {"run": str(Path(run).resolve()), "iterations": iterations, "engine_kind": engine_kind,
                "store": str(Path(store_dir) / "store") if local else None}
    trainer = (DataParallelTrainer if local else TorchTrainer)(
        rank_main,
        train_loop_config=settings,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        # a local cluster's workers join their own process group (rank_main), with the same timeout
        **({} if local else {"torch_config": TorchConfig(timeout_s=int(collective_timeout().total_seconds()))}),
        # Ray's own restarts would start a second job over the same run; a rerun of this command resumes instead.
        run_config=RunConfig(name="iterate", storage_path=str(layout.ray_storage(Path(run).resolve())),
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        failures = getattr(err, "worker_failures", {}) or {}
        ranks = ", ".join(f"rank {rank}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                          for rank, e in sorted(failures.items())) or str(err)[-500:]
        raise RayError(f"the Ray job over {run} failed ({ranks}); rerun the same command to resume from the "
                       "artifacts on disk") from None
    finally:
        if local:
            ray.shutdown()
            shutil.rmtree(store_dir, ignore_errors=True)
