"""The same engines and trainer on a GPU: they must agree with the CPU (run where CUDA is present)."""

import numpy as np
import pytest
import torch

from rgsd_pipeline.config import EngineConfig, ModelConfig, TrainConfig
from rgsd_pipeline.engines import Sampling
from rgsd_pipeline.examples import synthetic_example
from rgsd_pipeline.models import load_model
from rgsd_pipeline.render import chat_ids
from rgsd_pipeline.trainer import Trainer, World

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on GPU machines)")


@pytest.fixture(autouse=True)
def exact_matmuls():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_hf_engine_on_gpu_matches_a_cpu_forward_pass(tiny_path, tiny_tokenizer):
    from rgsd_pipeline.engines.hf_engine import HfEngine

    engine = HfEngine(tiny_path, EngineConfig(hf_batch_size=4), ModelConfig(max_model_len=1024))
    assert engine.device.type == "cuda"
    questions = ("What is DNA?", "Why do tides happen?")
    prompts = [chat_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in questions]
    generations = engine.generate(prompts, [1, 2], Sampling(max_new_tokens=16))
    cpu_model = load_model(tiny_path)
    for prompt, generation in zip(prompts, generations, strict=True):
        with torch.no_grad():
            logp = cpu_model(torch.tensor([prompt + generation.token_ids])).logits[0].log_softmax(-1)
        expected = logp[torch.arange(len(prompt) - 1, len(prompt) + len(generation.token_ids) - 1),
                        torch.tensor(generation.token_ids)]
        np.testing.assert_allclose(generation.logprobs, expected.numpy(), atol=1e-3)
    scores = engine.score([p + g.token_ids for p, g in zip(prompts, generations, strict=True)],
                          [len(p) for p in prompts], k=5)
    for score, generation in zip(scores, generations, strict=True):
        np.testing.assert_allclose(score.token_logprob_T, generation.logprobs, atol=1e-3)


def test_trainer_on_gpu_makes_the_cpu_update(tiny_path, monkeypatch):
    rng = np.random.default_rng(0)
    examples = [synthetic_example(rng.integers(3, 1000, 40), 24, rng.integers(3, 1000, (16, 4)), np.full((16, 4), 0.2))
                for _ in range(4)]
    config = TrainConfig(batch_size=4, micro_batch_size=2, learning_rate=1e-3, clip="none", epochs=2)
    results = {}
    for name in ("cuda", "cpu"):
        if name == "cpu":
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        trainer = Trainer(load_model(tiny_path), examples, config, World(), pad_id=0)
        assert trainer.device.type == name
        for step in range(trainer.total_steps):
            trainer.step(step)
        results[name] = {n: p.detach().cpu() for n, p in trainer.model.named_parameters()}
    for n, p in results["cpu"].items():
        torch.testing.assert_close(results["cuda"][n], p, atol=1e-4, rtol=1e-3)


def test_resident_iterate_colocates_on_one_gpu_and_equals_one_process_per_stage(tmp_path):
    """On a GPU the student's vLLM engine sleeps while the HF teacher scores and the trainer trains, wakes up,
    and takes the new weights in place; the run equals the per-stage one."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs upstream vllm on the GPU machine")
    from helpers import cli
    from safetensors.torch import load_file

    common = ["--config", "configs/tiny.yaml", "--iterations", 2, "engine.kind=vllm", "engine.score_kind=hf",
              "engine.vllm_gpu_memory_utilization=0.3", "data.max_prompts=16", "rollout.prompts_per_iteration=8",
              "train.batch_size=8"]
    resident = cli("iterate", "--run", tmp_path / "resident", *common).stdout
    assert "swapped in place 1 time(s)" in resident
    cli("iterate", "--run", tmp_path / "staged", "--per-stage", *common)
    for i in range(2):
        a = load_file(tmp_path / "resident" / f"iter-00{i}" / "checkpoint" / "model.safetensors")
        b = load_file(tmp_path / "staged" / f"iter-00{i}" / "checkpoint" / "model.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)
