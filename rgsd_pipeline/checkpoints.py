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

import copy
import hashlib
import shutil
from pathlib import Path

import click
import torch

from rgsd_pipeline import layout
from rgsd_pipeline.config import ConfigError, RunConfig, TrainConfig
from rgsd_pipeline.direct_io import write_safetensors
from rgsd_pipeline.fingerprints import TOKENIZER_FILES, record_weight_hashes
from rgsd_pipeline.models import load_model
from rgsd_pipeline.shards import ArtifactError, mark_complete, remove_leftovers, write_json_atomic
from rgsd_pipeline.trainer_state import exported_global_step, final_state, gather, state_global_step


def full_state_dict(model, keep: bool = True, dtype: str | None = None) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on the CPU, floating tensors in `dtype` (a collective under FSDP2, one tensor at
    a time; None on a process that does not `keep` it)."""
    return gather(model.state_dict(), keep, getattr(torch, dtype) if dtype else None)


def cast_floating(weights: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The state dict with every floating-point tensor in `dtype` (the engines' dtype, for export)."""
    target = getattr(torch, dtype)
    return {name: t.to(target) if t.is_floating_point() else t for name, t in weights.items()}


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
    """The trainer state iteration `iteration` continues from: the one policy_I was exported from (None at iteration
    0, when it was deleted, or when a kill left it unwritten or at an earlier step)."""
    return final_state(policy) if iteration > 0 else None


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
    """The run's optimizer steps before this iteration: from the checkpoint's provenance, else the previous trainer
    state, else 0 (the base model)."""
    recorded = exported_global_step(policy)
    if recorded is not None:
        return recorded
    return state_global_step(previous) if previous is not None else 0


def warn_without_state(policy: Path, config: RunConfig) -> None:
    click.secho(f"warning: {policy} has no trainer state; this iteration continues from its exported "
                f"{config.model.dtype} weights with fresh AdamW moments", fg="yellow", err=True)


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


def largest_difference(weights: dict[str, torch.Tensor], checkpoint: Path) -> float:
    """The largest absolute difference between `weights` (what exported_weights returns) and the weights files of a
    checkpoint, tensor by tensor (inf when their names or shapes differ)."""
    from safetensors.torch import load_file

    saved = {name: tensor for file in sorted(Path(checkpoint).glob("*.safetensors")) for name, tensor in
             load_file(file).items()}
    if saved.keys() != weights.keys() or any(saved[n].shape != t.shape for n, t in weights.items()):
        return float("inf")
    return max((saved[n].double() - t.double()).abs().max().item() for n, t in weights.items())


WEIGHTS_FILES = "model{suffix}.safetensors"  # transformers' names: model.safetensors, model-00001-of-00002...
SHARD_BYTES = "50GB"  # transformers' largest weights file before it shards


def write_model_folder(model, weights: dict[str, torch.Tensor], out: Path, dtype: str, past_cache: bool) -> dict:
    """What `save_pretrained` writes for `weights` (config.json naming `dtype`, generation_config.json, the weights
    in transformers' files, shards and index), written here so that each weights file is hashed as it is written
    (no read back) and, when `past_cache`, past the page cache (direct_io: no reader soon). Returns file -> sha256."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion

    out.mkdir(parents=True, exist_ok=True)
    model_config = copy.deepcopy(model.config)
    model_config.dtype = dtype
    model_config.architectures = [type(model).__name__.removeprefix("FSDP")]  # fully_shard renames the class
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, out, config=model_config)
    model_config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
    weights = revert_weight_conversion(model, weights)  # the checkpoint's layout where loading converted it
    split = split_torch_state_dict_into_shards(weights, filename_pattern=WEIGHTS_FILES, max_shard_size=SHARD_BYTES)
    digests = {}
    for name, tensors in split.filename_to_tensors.items():
        digest = hashlib.sha256()
        write_safetensors({t: weights[t] for t in tensors}, out / name, {"format": "pt"}, past_cache, digest)
        digests[name] = digest.hexdigest()
    if split.is_sharded:
        write_json_atomic(out / f"{WEIGHTS_FILES.format(suffix='')}.index.json",
                          {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                           "weight_map": split.tensor_to_filename})
    return digests


def write_checkpoint(model, policy: Path, out: Path, config: RunConfig, provenance: dict,
                     weights: dict | None = None, past_cache: bool = False, card=None) -> None:
    """The HF folder the next rollout loads, in model.dtype: weights, tokenizer files, provenance, the model card
    (`card(out)` writes it: model_card.py), then _SUCCESS.

    `weights` is what exported_weights returns (computed here when None). LoRA adapters are merged (unless
    train.save_adapters, which writes the adapters alone). `past_cache`: the next rollout takes these weights from
    memory, so the files skip the page cache."""
    try:
        _write_checkpoint(model, policy, out, config, provenance, weights, past_cache, card)
    except OSError as err:  # disk full, file-size limit: the folder has no _SUCCESS, so nothing reads it
        for partial in out.glob("*.safetensors"):  # the trainer state beside them is kept for the resume
            partial.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write the checkpoint {out}: {err.strerror or err}; nothing was published, free "
                            "space (or raise the limit) and rerun the command to resume") from err


def _write_checkpoint(model, policy: Path, out: Path, config: RunConfig, provenance: dict, weights: dict | None,
                      past_cache: bool, card) -> None:
    remove_leftovers(out)
    digests = None
    if config.train.lora and config.train.save_adapters:
        model.save_pretrained(out, safe_serialization=True)
    else:
        weights = weights if weights is not None else exported_weights(model, config)
        model = model.get_base_model() if config.train.lora else model
        digests = write_model_folder(model, weights, out, config.model.dtype, past_cache)
    for name in TOKENIZER_FILES:
        if (policy / name).exists():
            shutil.copy2(policy / name, out / name)
    write_json_atomic(layout.provenance_file(out), {**provenance, "dtype": config.model.dtype,
                                              "lora_adapters": bool(config.train.lora and config.train.save_adapters)})
    if card is not None:
        card(out)
    record_weight_hashes(out, digests)  # every file above, checked by whoever reads the checkpoint
    mark_complete(out)
