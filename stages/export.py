"""Command `export`: one checkpoint of a run as a folder to publish or serve, with its model card.

    rgsd-pipeline export --run runs/qwen2.5-3b-medical --iteration 191 --to exported/qwen-rgsd
    hf upload ORG/NAME exported/qwen-rgsd         # the folder as it is: weights, tokenizer, README.md

Writes a plain transformers folder (config, generation config, safetensors weights, tokenizer files and chat
template) in model.dtype, and README.md: the model card (rgsd_pipeline/model_card.py) with the recipe, the
fingerprint chain and the run's latest held-out evaluations of this checkpoint beside the base model's. A
checkpoint that holds LoRA adapters alone (train.save_adapters) is merged into the base model first, so the
folder loads with `AutoModelForCausalLM.from_pretrained` alone. The folder is written under a temporary name
and renamed when whole; an existing non-empty --to folder is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from rgsd_pipeline import layout
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.shards import ArtifactError, is_complete

# Files of an HF model folder worth publishing: the configs, weights and their index, tokenizer and chat template.
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "chat_template.*", "vocab.json", "merges.txt",
                      "added_tokens.json", "*.model", "*.tiktoken")
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       *TOKENIZER_PATTERNS)


def export(run: Path, iteration: int, target: Path) -> tuple[Path, str]:
    """Write iteration `iteration`'s checkpoint to `target` as a publishable folder; returns the folder and how its
    weights were made."""
    from rgsd_pipeline.model_card import write_model_card

    config = load_run_config(run)
    checkpoint = layout.checkpoint_dir(run, iteration)
    if not is_complete(checkpoint):
        raise ArtifactError(f"{checkpoint} is missing or incomplete; train iteration {iteration} first "
                            f"(`rgsd-pipeline train --run {run} --iteration {iteration}`)")
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ArtifactError(f"{target} exists and is not empty; remove it or export to another folder")
    provenance = json.loads(layout.provenance_file(checkpoint).read_text())
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if provenance.get("lora_adapters"):
        _merge_adapters(checkpoint, tmp, config)
        how = "LoRA adapters merged into the base model"
    else:
        for pattern in MODEL_FILE_PATTERNS:
            for file in checkpoint.glob(pattern):
                shutil.copy2(file, tmp / file.name)
        how = "weights copied"
    write_model_card(tmp, run, iteration, config, checkpoint, adapters=False)
    if target.exists():
        target.rmdir()
    os.replace(tmp, target)
    return target, how


def _merge_adapters(checkpoint: Path, out: Path, config) -> None:
    """The base model with the checkpoint's LoRA adapters merged in, written in model.dtype with its tokenizer."""
    import torch
    from peft import PeftModel

    from rgsd_pipeline.checkpoints import cast_floating, write_model_folder
    from rgsd_pipeline.models import load_model, resolve_model

    base = resolve_model(config.model)
    model = load_model(base, "float32", config.model.trust_remote_code, config.model.allow_pickle_weights)
    merged = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    weights = cast_floating({name: t.detach() for name, t in merged.state_dict().items()}, config.model.dtype)
    for tied in getattr(merged, "all_tied_weights_keys", {}):
        weights.pop(tied, None)
    with torch.no_grad():
        write_model_folder(merged, weights, out, config.model.dtype, past_cache=False)
    for pattern in TOKENIZER_PATTERNS:  # the tokenizer's files, from the base model
        for file in Path(base).glob(pattern):
            shutil.copy2(file, out / file.name)


@click.command("export")
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--iteration", required=True, type=click.IntRange(min=0), help="Iteration whose checkpoint to export.")
@click.option("--to", "target", required=True, type=click.Path(path_type=Path), help="Folder to write (new or empty).")
def command(run, iteration, target):
    """Write one checkpoint as a folder to publish: weights, tokenizer, model card (LoRA merged).

    The folder loads with transformers or vLLM as it is, and `hf upload ORG/NAME DIR` publishes it.
    """
    target, how = export(run, iteration, target)
    click.echo(f"exported iteration {iteration} of {run} to {target} ({how}); model card: "
               f"{layout.model_card_file(target)}")
