"""This process's place among the processes of one job: rank r of W, whoever started them.

`torchrun`, Slurm's `srun torchrun` and Ray Train's `TorchTrainer` all start W processes with RANK,
WORLD_SIZE and LOCAL_RANK in their environment; `init_world` joins (or finds) the process group, gloo on
CPUs and nccl on GPUs. Without a launcher a process is rank 0 of 1 and every collective is a no-op, so
the same code runs on one process, many GPUs, many machines (docs/architecture.md, "Many GPUs and machines").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes: rank 0 of 1 without a launcher."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The one process that writes what the job writes once (manifests, checkpoints, chain.json)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process got here (nothing to wait for alone)."""
        if self.size > 1:
            dist.barrier()


def device() -> torch.device:
    """This process's device: its local GPU under a launcher, else GPU 0, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


TIMEOUT_ENV = "RGSD_COLLECTIVE_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 120


def collective_timeout() -> timedelta:
    """How long a rank waits at a collective for the others (RGSD_COLLECTIVE_TIMEOUT_MINUTES, default 120). Ranks
    meet at the end of every stage, so the wait is the spread of their shares: a long sampling or judge stage on
    one rank must not trip torch's default (10 minutes under NCCL)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        from rgsd_pipeline.errors import UserError

        raise UserError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of minutes")
    return timedelta(minutes=minutes)


def init_world() -> World:
    """Join the process group when a launcher started several processes (gloo on CPU, nccl on GPU), with the
    collective timeout above; a launcher that joined it already (Ray Train) is used as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=collective_timeout())
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def leave_world(world: World) -> None:
    """Wait for every process, then leave the process group (a launcher that owns it, like Ray, keeps it)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
