"""This process's place among the processes of one job: rank r of W, whoever started them.

`torchrun`, Slurm's `srun torchrun` and Ray Train's `TorchTrainer` all start W processes with RANK,
WORLD_SIZE and LOCAL_RANK in their environment; `init_world` joins (or finds) the process group, gloo on
CPUs and nccl on GPUs. Without a launcher a process is rank 0 of 1 and every collective is a no-op, so
the same code runs on one process, many GPUs, many machines (docs/architecture.md, "Many GPUs and machines").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def init_world() -> World:
    """Join the process group when a launcher started several processes (gloo on CPU, nccl on GPU); a launcher
    that joined it already (Ray Train) is used as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def leave_world(world: World) -> None:
    """Wait for every process, then leave the process group (a launcher that owns it, like Ray, keeps it)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
