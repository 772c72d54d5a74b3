"""Each phase's measured memory peak beside the memory plan's estimate, once per iteration of a resident run.

On a GPU the peak of a phase is torch's reserved peak plus what the device holds outside torch's pool at the
phase's end (vLLM's own pool, the CUDA context, NCCL): `mem_get_info` sees the whole device, torch's counters only
its own pool. On a CPU it is the process's resident-set high-water mark (VmHWM), reset at the phase's start
(`/proc/self/clear_refs`); with glibc keeping freed memory (allocator.keep_freed_memory) the resident set does not
shrink between phases, so there each phase is held to the largest estimate so far.

The estimate is `memory_plan.plan` for this launch: the GPUs this job runs on, or on a CPU the engine's KV-cache
space and this process's resident set before any model loaded (in place of the CUDA context). A phase more than
`TOLERANCE` (and more than `SLACK`) over its estimate warns, naming the estimate's largest part. Every rank
measures; the main rank prints and writes the largest over ranks to iter-NNN/memory.json.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
import torch
import torch.distributed as dist

from rgsd_pipeline import layout, memory_plan
from rgsd_pipeline.allocator import keep_freed_memory
from rgsd_pipeline.memory_plan import GIB, PHASES
from rgsd_pipeline.shards import write_json_atomic

TOLERANCE = 0.10
SLACK = 256 << 20  # below this, a difference is allocator arenas and libraries loaded on first use, not a plan's part
PHASE_OF_STAGE = {"rollout": "sampling", "score": "scoring", "reward": "scoring", "train": "training"}


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (or its high-water mark, VmHWM), from /proc/self/status; 0 where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Start a phase's peak from what the process holds now."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # "5" resets VmHWM to the current resident set (proc(5))
            Path("/proc/self/clear_refs").write_text("5")


def read_peak() -> int:
    """Bytes at the peak of the phase since `reset_peak`."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()
        return torch.cuda.max_memory_reserved() + max(outside_torch, 0)
    return resident_bytes("VmHWM")


def cpu_launch(config, world, model_folder: Path) -> memory_plan.Launch:
    """The plan's launch on CPU ranks: the engine's KV-cache space as its share, and as overhead the resident set once
    the libraries every phase loads are imported (the model's transformers module, and vLLM's where it runs)."""
    import importlib.util
    import json
    import os

    model_type = json.loads((Path(model_folder) / "config.json").read_text()).get("model_type", "")
    libraries = [f"transformers.models.{model_type}.modeling_{model_type}"]
    if "vllm" in memory_plan.engine_kinds(config) and importlib.util.find_spec("vllm") is not None:
        libraries.append("vllm.entrypoints.llm")
    for library in libraries:
        with contextlib.suppress(ImportError):
            importlib.import_module(library)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return memory_plan.Launch(max(world.size // per_node, 1), per_node, total / per_node / GIB,
                              kv_cache_bytes=int(config.engine.vllm_cpu_kvcache_gib * GIB), overhead=resident_bytes())


class MemoryWatch:
    """Measures the phases of each iteration (`phase`), then reports and keeps them (`finish_iteration`)."""

    def __init__(self, run: Path, config, world, model_folder: Path):
        self.run, self.world = Path(run), world
        launch = (memory_plan.this_launch(world) if torch.cuda.is_available()
                  else cpu_launch(config, world, model_folder))
        self.parts = memory_plan.plan(memory_plan.Shape.of(model_folder), config, launch)
        self.kept = not torch.cuda.is_available() and keep_freed_memory()
        self.measured: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, stage: str):
        """Measure one stage's phase (a phase run twice, as scoring and reward, keeps its larger peak)."""
        name = PHASE_OF_STAGE[stage]
        reset_peak()
        yield
        self.measured[name] = max(self.measured.get(name, 0), read_peak())

    def estimate(self, phase: str) -> int:
        """The plan's peak for a phase; the largest up to it where freed memory is never returned."""
        phases = PHASES[:PHASES.index(phase) + 1] if self.kept else (phase,)
        return max(self.parts[f"{p}_peak"] for p in phases)

    def finish_iteration(self, iteration: int) -> dict | None:
        """Gather this iteration's peaks (largest over ranks), print them beside the plan, warn where one is over it,
        and write iter-NNN/memory.json; returns what was written (None where no phase ran)."""
        peaks_P = torch.tensor([self.measured.get(p, -1) for p in PHASES], dtype=torch.float64)
        self.measured = {}
        if self.world.size > 1:  # every rank reaches this at every iteration's end
            if dist.get_backend() == "nccl":
                peaks_P = peaks_P.cuda()
            dist.all_reduce(peaks_P, op=dist.ReduceOp.MAX)
        if not self.world.main or not (peaks_P >= 0).any():
            return None
        phases, lines = {}, []
        for phase, measured in zip(PHASES, peaks_P.tolist(), strict=True):
            if measured < 0:
                continue
            planned = self.estimate(phase)
            largest = memory_plan.largest_part(self.parts, phase)
            phases[phase] = {"measured_bytes": int(measured), "planned_bytes": planned, "largest_part": largest}
            lines.append(f"{phase} {measured / GIB:.2f} GiB (plan {planned / GIB:.2f})")
            if measured > planned * (1 + TOLERANCE) and measured - planned > SLACK:
                click.secho(f"warning: iteration {iteration}'s {phase} peak {measured / GIB:.2f} GiB is "
                            f"{measured / planned - 1:.0%} over the memory plan's {planned / GIB:.2f} GiB; its largest "
                            f"part is '{largest}' ({self.parts[largest] / GIB:.2f} GiB): see rgsd-pipeline plan",
                            fg="yellow", err=True)
        where = "GPU" if torch.cuda.is_available() else "process"
        click.echo(f"memory per {where}, iteration {iteration}: " + ", ".join(lines)
                   + (f" (largest of {self.world.size} ranks)" if self.world.size > 1 else ""))
        record = {"device": where, "ranks": self.world.size, "phases": phases,
                  "plan": {name: value for name, value in self.parts.items()}}
        write_json_atomic(layout.memory_file(self.run, iteration), record)
        return record
