"""What an iteration's training starts from, and the checkpoint it leaves for the next rollout.

Iteration I trains policy_I: the base model at I = 0, else what iteration I-1 left. Two copies of
policy_I exist after iteration I-1:

- iter-(I-1)/checkpoint/: a plain HF folder in model.dtype (bf16 in the paper-scale recipes), which the
  rollout engines load;
- iter-(I-1)/checkpoint/trainer_state/: the trainable weights in train.master_dtype (fp32), the AdamW
  moments and the run's global step.

Training continues from the second, so no precision is lost between iterations; the exported folder is
only read when the trainer state is missing (then with a warning). With LoRA the student is the base
model plus adapters that persist across iterations: the trainer state holds the adapters, and the
exported folder the base with the adapters merged in.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import click
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rgsd_pipeline import layout
from rgsd_pipeline.config import ConfigError, RunConfig, TrainConfig
from rgsd_pipeline.distributed import World
from rgsd_pipeline.fingerprints import TOKENIZER_FILES, record_weight_hashes
from rgsd_pipeline.models import load_model
from rgsd_pipeline.shards import ArtifactError, mark_complete, remove_leftovers, write_json_atomic


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates, by name (a tied weight once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; for an FSDP2 shard (DTensor) a collective every process must join."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU (a collective under FSDP2)."""
    return {name: _full(value) for name, value in model.state_dict().items()}


def cast_floating(weights: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The state dict with every floating-point tensor in `dtype` (the engines' dtype, for export)."""
    target = getattr(torch, dtype)
    return {name: t.to(target) if t.is_floating_point() else t for name, t in weights.items()}


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


def save_state(folder: Path, model, optimizer, step: int, world: World = World(), sharded: bool = False,
               global_step: int | None = None) -> None:
    """Write trainer state to a temporary folder and swap it in, so a kill never leaves half a state.

    Every process calls it: under FSDP2 each writes its optimizer shard, and gathering the weights is a
    collective; otherwise only the main process writes."""
    if not (sharded or world.main):
        return
    weights = {n: _full(p) for n, p in trainable(model).items()}
    tmp = folder.with_name(f".{folder.name}.tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        dist.barrier()
    torch.save({"optimizer": _local_state(optimizer.state_dict()), "torch_rng": torch.get_rng_state()},
               tmp / _optimizer_file(world, sharded))
    if sharded:
        dist.barrier()
    if not world.main:
        return
    save_file(weights, tmp / "weights.safetensors")
    state = {"step": step, "global_step": step if global_step is None else global_step,
             "processes": world.size if sharded else 1}
    (tmp / "state.json").write_text(json.dumps(state))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, model, optimizer, load_weights: bool = True, world: World = World(),
               sharded: bool = False, load_optimizer: bool = True) -> int:
    """Restore trainer state saved by save_state (the weights in the model's own dtype); returns its step."""
    if not folder.exists() and folder.with_name(f".{folder.name}.old").exists():
        folder = folder.with_name(f".{folder.name}.old")  # killed between the two renames
    saved_processes = json.loads((folder / "state.json").read_text()).get("processes", 1)
    if saved_processes != (world.size if sharded else 1):
        how = (f"torchrun --nproc-per-node {saved_processes} and train.parallel=fsdp" if saved_processes > 1
               else "train.parallel=ddp or one process")
        raise ArtifactError(f"{folder} holds the optimizer state of {saved_processes} process(es) "
                            f"({'sharded by FSDP2' if saved_processes > 1 else 'whole'}); resume it with {how}, "
                            "or delete it to restart this iteration")
    if load_weights:
        weights = load_file(folder / "weights.safetensors")
        with torch.no_grad():
            for name, param in trainable(model).items():
                if hasattr(param, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    param.copy_(distribute_tensor(weights[name].to(param.dtype), param.device_mesh, param.placements))
                else:
                    param.copy_(weights[name])
    if not load_optimizer:
        return json.loads((folder / "state.json").read_text())["step"]
    path = folder / _optimizer_file(world, sharded)
    try:
        bundle = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ArtifactError(f"{path} holds more than tensors and plain containers; it is not unpickled "
                            f"(weights_only=True). Delete {folder} to train this iteration from its start") from err
    optimizer.load_state_dict(_sharded_like(optimizer, bundle["optimizer"]) if sharded else bundle["optimizer"])
    torch.set_rng_state(bundle["torch_rng"])
    return json.loads((folder / "state.json").read_text())["step"]


def find_state(checkpoint: Path) -> Path | None:
    """The trainer state saved beside a checkpoint (or the one a kill left between two renames), if any."""
    state = layout.trainer_state_dir(checkpoint)
    for candidate in (state, state.with_name(f".{state.name}.old")):
        if (candidate / "state.json").exists():
            return candidate
    return None


def state_global_step(state: Path) -> int:
    """The run's global step at which a trainer state was saved."""
    saved = json.loads((state / "state.json").read_text())
    return saved.get("global_step", saved["step"])


def with_lora(model, train_config: TrainConfig):
    """The model wrapped with fresh LoRA adapters (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("train.lora needs peft: pip install 'rgsd-pipeline[lora]'") from None
    targets = train_config.lora_target_modules
    lora = LoraConfig(r=train_config.lora_rank, lora_alpha=train_config.lora_alpha,
                      lora_dropout=train_config.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    return get_peft_model(model, lora)


def previous_state(policy: Path, iteration: int) -> Path | None:
    """The trainer state iteration `iteration` continues from (None at iteration 0, or when it was deleted)."""
    return find_state(policy) if iteration > 0 else None


def load_student(base: Path, policy: Path, previous: Path | None, config: RunConfig):
    """The model iteration I trains, in train.master_dtype, before any trainer state is loaded into it.

    Full fine-tuning starts from policy_I's exported weights (upcast); the trainer state's master weights
    replace them when loaded. LoRA with a previous state starts from the base model, to which that state's
    adapters belong; without one, from policy_I (the base, or an exported merge) with fresh adapters.
    """
    start = base if config.train.lora and previous is not None else policy
    model = load_model(start, config.train.master_dtype, config.model.trust_remote_code,
                       config.model.allow_pickle_weights)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.lora:
        model = with_lora(model, config.train)
    return model


def previous_global_step(policy: Path, previous: Path | None) -> int:
    """The run's optimizer steps before this iteration: from the previous trainer state, else the checkpoint's
    provenance, else 0 (the base model)."""
    if previous is not None:
        return state_global_step(previous)
    provenance = layout.provenance_file(policy)
    return json.loads(provenance.read_text()).get("global_step", 0) if provenance.exists() else 0


def warn_without_state(policy: Path, config: RunConfig) -> None:
    click.secho(f"warning: {policy} has no trainer state; this iteration continues from its exported "
                f"{config.model.dtype} weights with fresh AdamW moments", fg="yellow", err=True)


def prune_states(run: Path, iteration: int, keep: int) -> list[Path]:
    """Delete the trainer states of iterations before the last `keep` (0 keeps all); returns what was deleted.

    At one optimizer step per iteration a 7B model leaves ~84 GB of fp32 weights and AdamW moments per
    iteration; only the latest is needed to continue. A deleted state makes retraining that iteration's
    successor start from the exported weights (with a warning)."""
    if keep == 0:
        return []
    deleted = []
    for older in range(iteration - keep + 1):
        state = find_state(layout.checkpoint_dir(run, older))
        if state is not None:
            shutil.rmtree(state)
            deleted.append(state)
    return deleted


def merged_lora_weights(model) -> dict:
    """The base model's state dict with every LoRA layer's delta added in, leaving the adapters in place (a
    resident `iterate` keeps training them)."""
    base = model.get_base_model()
    weights = {name.replace(".base_layer", ""): tensor.detach().cpu().clone()
               for name, tensor in base.state_dict().items() if "lora_" not in name}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = weights[f"{name}.weight"]
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).detach().cpu().to(weight.dtype)
    return weights


def exported_weights(model, config: RunConfig, weights: dict | None = None) -> dict:
    """The state dict the next policy's engines load: LoRA merged, floating tensors in model.dtype, tied copies (e.g.
    lm_head.weight, tied to the embeddings) left out. `weights` is the gathered state dict under FSDP2."""
    if config.train.lora:
        weights, model = merged_lora_weights(model), model.get_base_model()
    weights = cast_floating(weights if weights is not None else full_state_dict(model), config.model.dtype)
    for tied in getattr(model, "all_tied_weights_keys", {}):
        weights.pop(tied, None)
    return weights


def write_checkpoint(model, policy: Path, out: Path, config: RunConfig, provenance: dict,
                     weights: dict | None = None) -> None:
    """The HF folder the next rollout loads, in model.dtype: weights, tokenizer files, provenance, then _SUCCESS.

    `weights` is what exported_weights returns (computed here when None). LoRA adapters are merged (unless
    train.save_adapters, which writes the adapters alone)."""
    remove_leftovers(out)
    merged = not (config.train.lora and config.train.save_adapters)
    if merged:
        weights = weights if weights is not None else exported_weights(model, config)
        model = model.get_base_model() if config.train.lora else model
    model.save_pretrained(out, safe_serialization=True, state_dict=weights)
    if merged:  # save_pretrained writes the dtype of the model in memory (fp32); say what the file holds
        model_config = json.loads((out / "config.json").read_text())
        write_json_atomic(out / "config.json", {**model_config, "dtype": config.model.dtype})
    for name in TOKENIZER_FILES:
        if (policy / name).exists():
            shutil.copy2(policy / name, out / name)
    record_weight_hashes(out)  # read back while the file is still in the page cache
    write_json_atomic(layout.provenance_file(out), {**provenance, "dtype": config.model.dtype,
                                              "lora_adapters": bool(config.train.lora and config.train.save_adapters)})
    mark_complete(out)
