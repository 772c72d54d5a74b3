"""`export`: one checkpoint as a folder to publish, LoRA adapters merged (tests/test_hub.py exports a full
fine-tune of a Hub model and checks its card)."""

import json

import pytest
import yaml
from helpers import ROOT, cli
from test_hub import assert_same_logits


@pytest.mark.slow
def test_a_lora_adapter_checkpoint_exports_merged_and_loads_without_peft(tmp_path, model_cache, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["engine"]["kind"] = "hf"
    config["data"].update(max_prompts=8, rows_per_shard=8)
    config["rollout"]["max_new_tokens"] = 16
    config["train"] = {"batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-2, "lora": True, "lora_rank": 4,
                       "save_adapters": True}
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    cli("iterate", "--config", recipe, "--run", run, "--iterations", 1)
    checkpoint = run / "iter-000" / "checkpoint"
    assert json.loads((checkpoint / "rgsd.json").read_text())["lora_adapters"]
    assert yaml.safe_load((checkpoint / "README.md").read_text().split("---\n")[1])["library_name"] == "peft"

    out = cli("export", "--run", run, "--iteration", 0, "--to", tmp_path / "merged").stdout
    assert "LoRA adapters merged" in out
    merged = tmp_path / "merged"
    assert not list(merged.glob("adapter_*")) and (merged / "model.safetensors").exists()
    card = yaml.safe_load((merged / "README.md").read_text().split("---\n")[1])
    assert card["library_name"] == "transformers" and "base_model" not in card  # a built-in base has no Hub id
    # The reference: the base model with the adapters applied unmerged, by peft.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(checkpoint))
    assert_same_logits(merged, adapted.eval(), atol=1e-4)
