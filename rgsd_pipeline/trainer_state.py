"""Trainer state on disk: what training continues from without losing precision, and what a killed run resumes from.

    iter-I/checkpoint/trainer_state/
        weights.safetensors   the trainable weights in train.master_dtype (fp32)
        optimizer.pt          AdamW moments and the torch RNG (weights_only; one file per process under FSDP2)
        state.json            the iteration's step, the run's global step, how many processes wrote it, and the
                              sha256 and size of every file beside it, taken while writing

A state is what a resume after a kill loads, so each file it reads is checked against state.json first (a read of
what the load reads anyway): a damaged state is refused by name, never trained on. Writes take the state's lock
(`.trainer_state.lock` beside it), the kind every writer of a run folder takes.

A state is written to a temporary folder and swapped in whole, so a kill never leaves half of one. Its files go
past the page cache (direct_io.py): they are read again only after a kill, and on machines that hand freed memory
back to their host, caching them cost seconds of page faults per iteration.

Writes run in a background thread, one at a time per process, from the tensors training holds (on a CPU, no
copy): the optimizer step that would change those tensors first waits for the write (`wait_for_writes`), so a
1.6 GB state of SmolLM2 is written while the next micro-batches, the export and the next rollout run, by a
thread at the lowest priority, which takes the cores only when that work leaves them idle. (Under
FSDP2 the processes write together, between barriers, in the foreground.) Older iterations' states are deleted
only while a newer one is on disk. So, whenever a kill lands, the disk holds a state from which the finished
iterations can be trained again: a checkpoint whose own final state was never written (or holds an earlier
step) is rebuilt by training that iteration again from its signals (training.replay_iteration).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rgsd_pipeline import layout
from rgsd_pipeline.direct_io import write_safetensors, write_torch
from rgsd_pipeline.distributed import World
from rgsd_pipeline.shards import ArtifactError, exclusive_lock, sha256_file


def _yield_to_the_work() -> None:
    """Run this thread at the lowest scheduling priority (Linux: a thread's own nice value). The write overlaps the
    next rollout, whose OpenMP threads wait for each other at every parallel region: at equal priority a writer
    that takes one of their cores stalls them all. On a 2-core CPU (SmolLM2, 4 resident iterations of 16) sampling
    took 43.5 s beside writers at equal priority and 31.3 s beside niced ones."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


# One writer thread per process. Python joins it at exit, so a state being written when the process ends normally
# is finished first; errors are raised by the next wait_for_writes.
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-state", initializer=_yield_to_the_work)
_pending: Future | None = None
# Closed by hold_writes: the writer starts the next write only once it opens (open_writes, wait_for_writes) or
# after HOLD_SECONDS, so that a write never waits on a caller that forgot it.
_open = threading.Event()
_open.set()
HOLD_SECONDS = 60.0


def hold_writes() -> None:
    """Hold the next background write until open_writes: a resident run holds the final state's write while the
    student's engine takes the new weights, which on a 2-core CPU ran 1.5 to 3 s beside it against 0.3 s alone."""
    _open.clear()


def open_writes() -> None:
    """Let the writer start what hold_writes held."""
    _open.set()


def _when_open(job, *args) -> None:
    _open.wait(HOLD_SECONDS)
    job(*args)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates, by name (a tied weight once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def full_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole tensor on the CPU, a floating one cast to `dtype` on its device first (half the copy for bf16); for
    an FSDP2 shard (DTensor) a collective every process must join."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().cpu().contiguous()


def gather(tensors: dict[str, torch.Tensor], keep: bool = True, dtype: torch.dtype | None = None) -> dict | None:
    """The whole tensors on the CPU, gathered one at a time (under FSDP2 every process joins each gather, so a rank's
    device holds one full tensor at a time); a process that does not `keep` them joins and holds nothing."""
    gathered = {}
    for name, tensor in tensors.items():
        whole = full_tensor(tensor, dtype)
        if keep:
            gathered[name] = whole
    return gathered if keep else None


def _optimizer_file(world: World, sharded: bool) -> str:
    return f"optimizer-{world.rank}-of-{world.size}.pt" if sharded else "optimizer.pt"


def _local_state(state):
    """Optimizer state with FSDP2 shards as plain local tensors (what a weights_only load accepts)."""
    if isinstance(state, dict):
        return {k: _local_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_local_state(v) for v in state]
    return state.to_local() if hasattr(state, "to_local") else state


def _sharded_like(optimizer, saved: dict) -> dict:
    """Saved local optimizer shards turned back into DTensors placed like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = DTensor.from_local(value, param.device_mesh, param.placements,
                                                    shape=param.shape, stride=param.stride())
    return saved


def wait_for_writes() -> None:
    """Block until the state being written in the background is on disk; raise what its write raised."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        open_writes()
        pending.result()


def save_state(folder: Path, model, optimizer, step: int, world: World = World(), sharded: bool = False,
               global_step: int | None = None, background: bool = False) -> None:
    """Write trainer state to a temporary folder and swap it in, so a kill never leaves half a state.

    Every process calls it: under FSDP2 each writes its optimizer shard, and gathering the weights is a
    collective; otherwise only the main process writes. With `background`, the write runs in this process's
    writer thread and this returns at once; the caller must wait_for_writes before changing the model or the
    optimizer (Trainer.step does)."""
    global _pending
    if not (sharded or world.main):
        return
    wait_for_writes()
    weights = gather(trainable(model), keep=world.main)  # a collective under FSDP2, kept by the writer alone
    bundle = {"optimizer": _local_state(optimizer.state_dict()), "torch_rng": torch.get_rng_state()}
    state = {"step": step, "global_step": step if global_step is None else global_step,
             "processes": world.size if sharded else 1}
    tmp = folder.with_name(f".{folder.name}.tmp")
    if sharded:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        name, digest = _optimizer_file(world, sharded), hashlib.sha256()
        write_torch(bundle, tmp / name, digest)
        shards = [None] * world.size
        dist.all_gather_object(shards, (name, {"sha256": digest.hexdigest(), "size": (tmp / name).stat().st_size}))
        if world.main:
            _write(folder, tmp, weights, None, {**state, "files": dict(shards)})
    elif background:
        _pending = _writer.submit(_when_open, _write_or_explain, folder, tmp, weights, bundle, state)
    else:
        _write(folder, tmp, weights, bundle, state)


def _write_or_explain(folder: Path, tmp: Path, weights: dict, bundle: dict, state: dict) -> None:
    """_write in the writer thread: its error, raised later by wait_for_writes, names the state it was writing."""
    try:
        _write(folder, tmp, weights, bundle, state)
    except OSError as err:
        raise ArtifactError(f"writing the trainer state {folder} (step {state['step']}) failed: {err}. Free the space "
                            "or fix the folder, then rerun: the run continues from what is on disk") from err


def _write(folder: Path, tmp: Path, weights: dict, bundle: dict | None, state: dict) -> None:
    """The main process's part of a save: weights, optimizer (unless already written), state.json with every file's
    checksum, then the swap; under the state's lock."""
    with exclusive_lock(layout.trainer_state_lock(folder), f"the trainer state {folder}"):
        files = dict(state.pop("files", {}))
        if bundle is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            files["optimizer.pt"] = _written(write_torch, bundle, tmp / "optimizer.pt")
        files["weights.safetensors"] = _written(write_safetensors, weights, tmp / "weights.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "files": files}))
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)


def _written(write, obj, path: Path) -> dict:
    """Write `obj` with a direct_io writer, hashing it on the way; its sha256 and size."""
    digest = hashlib.sha256()
    if write is write_safetensors:
        write(obj, path, digest=digest)
    else:
        write(obj, path, digest)
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


def read_state_file(folder: Path) -> dict:
    """A trainer state's state.json; ArtifactError naming it when it cannot be read."""
    path = Path(folder) / "state.json"
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
            raise ValueError("no step")
        return saved
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} cannot be read ({err}); delete {folder}: training then starts from the state "
                            "before it (or trains the iteration before it again from its signals)") from None


def _verified(folder: Path, name: str) -> Path:
    """A file of a trainer state, checked against the sha256 and size state.json holds for it (a state written by an
    earlier release, without them, is read as it is)."""
    path = folder / name
    recorded = read_state_file(folder).get("files", {}).get(name)
    if recorded is None:
        if "files" in read_state_file(folder):
            raise ArtifactError(f"{folder / 'state.json'} lists no {name}; delete {folder} to train from the state "
                                "before it")
        return path
    if not path.exists() or path.stat().st_size != recorded["size"] or sha256_file(path) != recorded["sha256"]:
        raise ArtifactError(f"{path} does not match its checksum in {folder / 'state.json'} (damaged or replaced "
                            f"since it was written); delete {folder}: training then starts from the state before it "
                            "(or trains the iteration before it again from its signals), never from damaged bytes")
    return path


def load_state(folder: Path, model, optimizer, load_weights: bool = True, world: World = World(),
               sharded: bool = False, load_optimizer: bool = True) -> int:
    """Restore trainer state saved by save_state (the weights in the model's own dtype); returns its step."""
    wait_for_writes()
    if not folder.exists() and folder.with_name(f".{folder.name}.old").exists():
        folder = folder.with_name(f".{folder.name}.old")  # killed between the two renames
    saved_processes = read_state_file(folder).get("processes", 1)
    if saved_processes != (world.size if sharded else 1):
        how = (f"torchrun --nproc-per-node {saved_processes} and train.parallel=fsdp" if saved_processes > 1
               else "train.parallel=ddp or one process")
        raise ArtifactError(f"{folder} holds the optimizer state of {saved_processes} process(es) "
                            f"({'sharded by FSDP2' if saved_processes > 1 else 'whole'}); resume it with {how}, "
                            "or delete it to restart this iteration")
    if load_weights:
        weights = load_file(_verified(folder, "weights.safetensors"))
        with torch.no_grad():
            for name, param in trainable(model).items():
                if hasattr(param, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    param.copy_(distribute_tensor(weights[name].to(param.dtype), param.device_mesh, param.placements))
                else:
                    param.copy_(weights[name])
    if not load_optimizer:
        return read_state_file(folder)["step"]
    path = _verified(folder, _optimizer_file(world, sharded))
    try:
        bundle = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ArtifactError(f"{path} holds more than tensors and plain containers; it is not unpickled "
                            f"(weights_only=True). Delete {folder} to train this iteration from its start") from err
    optimizer.load_state_dict(_sharded_like(optimizer, bundle["optimizer"]) if sharded else bundle["optimizer"])
    torch.set_rng_state(bundle["torch_rng"])
    return read_state_file(folder)["step"]


def find_state(checkpoint: Path) -> Path | None:
    """The trainer state saved beside a checkpoint (or the one a kill left between two renames), if any."""
    state = layout.trainer_state_dir(checkpoint)
    for candidate in (state, state.with_name(f".{state.name}.old")):
        if (candidate / "state.json").exists():
            return candidate
    return None


def state_global_step(state: Path) -> int:
    """The run's global step at which a trainer state was saved."""
    saved = read_state_file(state)
    return saved.get("global_step", saved["step"])


def exported_global_step(checkpoint: Path) -> int | None:
    """The run's global step at which a checkpoint was exported (its rgsd.json), if recorded."""
    provenance = layout.provenance_file(checkpoint)
    return json.loads(provenance.read_text()).get("global_step") if provenance.exists() else None


def final_state(checkpoint: Path) -> Path | None:
    """The trainer state a complete checkpoint was exported from: the one beside it, when it was saved at the
    checkpoint's own global step (rgsd.json). None when it is missing, or holds an earlier step of the iteration (a
    kill landed while the final state was being written)."""
    state = find_state(checkpoint)
    exported_at = exported_global_step(checkpoint) if state is not None else None
    return state if exported_at is None or state_global_step(state) == exported_at else None


def prune_states(run: Path, iteration: int, keep: int) -> list[Path]:
    """Delete the trainer states of iterations before the newest `keep` final ones (see final_state) up to
    `iteration` (0 keeps all); returns what was deleted.

    At one optimizer step per iteration a 7B model leaves ~91 GB of fp32 weights and AdamW moments per
    iteration; only the latest is needed to continue. A state still being written is not final on disk yet, so
    the one before it stays until the next prune: training can always continue from the disk, and a resumed
    iteration starts from what it first started from."""
    if keep == 0:
        return []
    finals = [older for older in range(iteration, -1, -1) if final_state(layout.checkpoint_dir(run, older))]
    if len(finals) <= keep:
        return []
    deleted = []
    for older in range(finals[keep - 1]):
        state = find_state(layout.checkpoint_dir(run, older))
        if state is not None:
            shutil.rmtree(state)
            deleted.append(state)
    return deleted
