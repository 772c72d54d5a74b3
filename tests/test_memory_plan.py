"""The memory plan of a resident iterate: parameter counts against real models, refusals with the arithmetic."""

import json

import pytest
import torch
from helpers import ROOT, cli

from rgsd_pipeline.config import load_config
from rgsd_pipeline.memory_plan import GIB, Launch, PlanError, Shape, check, plan
from rgsd_pipeline.models import load_model, resolve_model

QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


@pytest.mark.parametrize("name", ["builtin:tiny", "builtin:tiny-qwen2", "builtin:tiny-qwen3-thinking"])
def test_parameter_count_from_config_equals_the_model(name):
    """Untied Llama and tied Qwen2 (q/k/v biases): the estimate counts what the model holds."""
    path = resolve_model(name)
    model = load_model(path)
    assert Shape.of(path).parameters == sum(p.numel() for p in model.parameters())


@pytest.fixture
def qwen7b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    return tmp_path


def test_the_7b_recipe_fits_one_node_of_eight_gpus_and_shards_its_state(qwen7b):
    config = load_config(ROOT / "configs" / "qwen2.5-7b-medical.yaml", [f"model.path={qwen7b}"])
    shape = Shape.of(qwen7b)
    assert 7.6e9 < shape.parameters < 7.65e9  # Qwen2.5-7B: 7.62B
    one, two = plan(shape, config, Launch(1, 8)), plan(shape, config, Launch(2, 8))
    assert one["trainer"] == shape.parameters * 16 // 8 and two["trainer"] == shape.parameters * 16 // 16
    assert "peak" in check(shape, config, Launch(1, 8, 80))
    assert max(one["sampling_peak"], one["training_peak"]) < 80 * GIB


def test_a_kl_reference_is_counted_in_model_dtype_in_both_phases(qwen7b):
    """GRPO with train.kl_coef holds the frozen base in the trainer for the whole run: b * P in model.dtype (bf16:
    15.2 GB at 7B), in the sampling and the training peak; none without the KL term."""
    recipe = ROOT / "configs" / "qwen2.5-7b-medical.yaml"
    grpo = [f"model.path={qwen7b}", "train.loss=grpo", "rollout.samples_per_prompt=4"]
    shape = Shape.of(qwen7b)
    without = plan(shape, load_config(recipe, grpo), Launch(1, 8))
    config = load_config(recipe, [*grpo, "train.kl_coef=0.05"])
    assert config.model.dtype == "bfloat16"
    planned = plan(shape, config, Launch(1, 8))
    assert without["reference"] == 0 and planned["reference"] == 2 * shape.parameters
    for peak in ("sampling_peak", "training_peak"):
        assert planned[peak] - without[peak] == 2 * shape.parameters
    assert "reference" in check(shape, config, Launch(1, 8, 80))


def test_a_recipe_that_cannot_fit_is_refused_with_the_arithmetic(qwen7b):
    """The same recipe on one GPU: 16 bytes per parameter of training state alone is 114 GiB."""
    result = cli("plan", "--config", ROOT / "configs" / "qwen2.5-7b-medical.yaml", "--gpus-per-node", 1,
                 f"model.path={qwen7b}", check=False)
    assert result.returncode == 2, result.stderr
    assert "this recipe does not fit" in result.stderr and "113.5 GiB   float32 weights" in result.stderr
    with pytest.raises(PlanError, match="KV cache than 4 sequences"):
        config = load_config(ROOT / "configs" / "qwen2.5-7b-medical.yaml",
                             [f"model.path={qwen7b}", "engine.vllm_gpu_memory_utilization=0.18"])
        check(Shape.of(qwen7b), config, Launch(2, 8, 80))


QWEN_SHAPES = {
    "qwen2.5-3b": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": QWEN25_7B,
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
}


def test_a_trainer_state_is_twelve_bytes_a_parameter_as_its_files_are(tmp_path):
    """The disk plan's state size against a state written by the trainer (fp32 weights + two AdamW moments)."""
    from rgsd_pipeline import disk_plan, trainer_state
    from rgsd_pipeline.config import RunConfig

    path = resolve_model("builtin:tiny-qwen2")
    model = load_model(path)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    trainer_state.save_state(tmp_path / "state", model, optimizer, 1)
    written = sum(f.stat().st_size for f in (tmp_path / "state").iterdir())
    planned = disk_plan.state_bytes(Shape.of(path), RunConfig())
    assert planned == 12 * sum(p.numel() for p in model.parameters())
    assert 0.95 < written / planned < 1.10  # the files' headers and AdamW's step counters on top


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("qwen*.yaml")), ids=lambda p: p.stem)
def test_every_qwen_recipe_keeps_its_state_writes_under_a_tenth_of_the_iterations_they_follow(recipe, tmp_path):
    """At 1 GB/s on one node of 8 GPUs, as `plan` estimates it; and `plan` prints the writes with their seconds."""
    from rgsd_pipeline import disk_plan

    shape_name = next(name for name in QWEN_SHAPES if recipe.stem.startswith(name))
    (tmp_path / "config.json").write_text(json.dumps(QWEN_SHAPES[shape_name]))
    config = load_config(recipe, [f"model.path={tmp_path}"])
    shape, launch = Shape.of(tmp_path), Launch(1, 8, 80)
    iteration = disk_plan.iteration_time(shape, config, launch, 1e9).total
    state_seconds = disk_plan.state_bytes(shape, config) / 1e9
    assert state_seconds > iteration  # every iteration, a state write would outlast the iteration
    assert state_seconds / (config.train.state_every_iterations * iteration) <= disk_plan.STATE_SHARE
    assert config.train.keep_states == 1
    text = cli("plan", "--config", recipe, f"model.path={tmp_path}", "--disk-gbps", 2).stdout
    assert "disk per iteration at 2 GB/s" in text and f"{state_seconds / 2:8.1f} s" in text
