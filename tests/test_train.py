"""`rgsd-pipeline train`: learning, resume equality, torchrun equality, LoRA, loadable checkpoints."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, cli, copy_run
from safetensors.torch import load_file

from rgsd_pipeline.checkpoints import load_student
from rgsd_pipeline.config import TrainConfig, load_config
from rgsd_pipeline.examples import synthetic_example
from rgsd_pipeline.models import load_model
from rgsd_pipeline.trainer import Trainer, World, micro_batches
from rgsd_pipeline.trainer_state import trainable

PREPARE = ["prepare", "--config", "configs/tiny.yaml", "engine.kind=hf", "data.max_prompts=24", "data.rows_per_shard=8",
           "train.batch_size=4", "train.micro_batch_size=2", "train.learning_rate=1e-3", "train.save_every=2",
           "train.clip=none"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    run = tmp_path_factory.mktemp("scored") / "run"
    cli(*PREPARE, "--run", run)
    cli("rollout", "--run", run, "--iteration", 0)
    cli("score", "--run", run, "--iteration", 0)
    return run


def weights(run):
    return load_file(run / "iter-000" / "checkpoint" / "model.safetensors")


def test_a_bf16_recipe_trains_fp32_master_weights_like_a_float64_adamw(tiny_path):
    """model.dtype=bfloat16 at lr 1e-6 (the paper recipes): after 4 steps >= 99% of every trained matrix has moved,
    and the weights equal AdamW applied by hand in float64 to the same gradients. Updated in bf16, ~2% would move."""
    config = load_config(ROOT / "configs" / "tiny.yaml", ["model.dtype=bfloat16", "train.learning_rate=1e-6",
                                                          "train.batch_size=4", "train.micro_batch_size=2"])
    model = load_student(tiny_path, tiny_path, None, config)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    rng = np.random.default_rng(0)
    examples = [synthetic_example(rng.integers(3, 1000, 40), 24, rng.integers(3, 1000, (16, 4)),
                                  np.tile([0.4, 0.3, 0.2, 0.05], (16, 1))) for _ in range(16)]
    trainer = Trainer(model, examples, config.train, World(), pad_id=0)
    params = trainable(model)
    weights = {n: p.detach().double().clone() for n, p in params.items()}
    initial = {n: w.clone() for n, w in weights.items()}
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.detach().double().clone() for n, p in params.items()}))
    for step in range(4):
        trainer.step(step)

    (beta1, beta2), eps, lr = (0.9, 0.999), 1e-8, 1e-6
    first = {n: torch.zeros_like(w) for n, w in weights.items()}
    second = {n: torch.zeros_like(w) for n, w in weights.items()}
    for t, grad in enumerate(grads, start=1):
        for n in weights:
            first[n] = beta1 * first[n] + (1 - beta1) * grad[n]
            second[n] = beta2 * second[n] + (1 - beta2) * grad[n] ** 2
            update = (first[n] / (1 - beta1 ** t)) / ((second[n] / (1 - beta2 ** t)).sqrt() + eps)
            weights[n] = weights[n] - lr * update
    for name, param in params.items():
        # fp32 rounds each of the 4 updates to its spacing at |w| (1.2e-7 relative); bf16 would be off by 4e-3.
        torch.testing.assert_close(param.detach().double(), weights[name], atol=2e-8, rtol=5e-7)
        if param.dim() == 2:
            trained = grads[0][name].abs().sum(-1) > 0  # embedding rows of tokens never seen get no gradient
            moved = (param.detach().double() != initial[name])[trained].float().mean()
            assert moved >= 0.99, (name, float(moved))


def test_micro_batches_group_similar_lengths_and_keep_the_full_batch_gradient(tiny_path):
    """A step's micro-batches are cut from its sequences sorted longest first: here 224 padded positions instead of
    the 396 of batch order, and the gradient is the full batch's in one micro-batch (to float rounding)."""
    lengths = {0: 10, 1: 100, 2: 12, 3: 98}
    layout = micro_batches([0, 1, 2, 3], lengths, 2)
    assert layout == [[1, 3], [2, 0]]
    assert sum(max(lengths[i] for i in m) * len(m) for m in layout) == 224  # batch order: 2*100 + 2*98 = 396

    rng = np.random.default_rng(1)
    examples = [synthetic_example(rng.integers(3, 1000, n), n // 2, rng.integers(3, 1000, (n - n // 2, 4)),
                                  np.tile([0.4, 0.3, 0.2, 0.05], (n - n // 2, 1))) for n in (12, 40, 14, 38)]
    grads = {}
    for micro in (2, 4):
        config = load_config(ROOT / "configs" / "tiny.yaml", ["train.batch_size=4", f"train.micro_batch_size={micro}",
                                                              "train.learning_rate=1e-3"])
        model = load_student(tiny_path, tiny_path, None, config)
        trainer = Trainer(model, examples, config.train, World(), pad_id=0)
        params = trainable(model)
        seen = []
        trainer.optimizer.register_step_pre_hook(
            lambda *_, params=params, seen=seen: seen.append({n: p.grad.detach().clone() for n, p in params.items()}))
        trainer.step(0)
        grads[micro] = seen[0]
    for name in grads[4]:
        torch.testing.assert_close(grads[2][name], grads[4][name], atol=1e-6, rtol=1e-4)


def test_the_next_iteration_continues_from_the_fp32_master_weights_not_the_bf16_export(tiny_path, tmp_path):
    from rgsd_pipeline.checkpoints import previous_global_step, previous_state, write_checkpoint

    config = load_config(ROOT / "configs" / "tiny.yaml", ["model.dtype=bfloat16"])
    trained = load_student(tiny_path, tiny_path, None, config)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 1e-5)  # below bf16's spacing: lost by the export
    checkpoint = tmp_path / "iter-000" / "checkpoint"
    first = Trainer(trained, [], config.train, World(), pad_id=0)
    first.save(checkpoint / "trainer_state", step=3)
    write_checkpoint(trained, tiny_path, checkpoint, config, {"global_step": 3})
    exported = load_file(checkpoint / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"

    previous = previous_state(checkpoint, iteration=1)
    student = load_student(tiny_path, checkpoint, previous, config)
    Trainer(student, [], config.train, World(), pad_id=0).load(previous)
    for (name, got), want in zip(student.named_parameters(), trained.parameters(), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    assert previous_global_step(checkpoint, previous) == 3


@pytest.mark.parametrize("past_cache", [True, False])
@pytest.mark.parametrize("shard_bytes", ["50GB", "300KB"])
def test_the_exported_folder_is_what_save_pretrained_writes_with_digests_taken_while_writing(
        tiny_path, tmp_path, monkeypatch, shard_bytes, past_cache):
    import hashlib

    from rgsd_pipeline import checkpoints

    monkeypatch.setattr(checkpoints, "SHARD_BYTES", shard_bytes)
    config = load_config(ROOT / "configs" / "tiny.yaml")
    model = load_model(tiny_path)
    exported = checkpoints.exported_weights(model, config)
    ours, library = tmp_path / "ours", tmp_path / "library"
    checkpoints.write_checkpoint(model, tiny_path, ours, config, {"global_step": 1}, exported, past_cache=past_cache)
    model.save_pretrained(library, state_dict=dict(exported), max_shard_size=shard_bytes)
    written = sorted(p.name for p in library.iterdir())
    assert ("model.safetensors.index.json" in written) == (shard_bytes == "300KB")  # shards beside their index
    for name in written:
        if name.endswith(".json"):
            assert json.loads((ours / name).read_text()) == json.loads((library / name).read_text()), name
        else:
            assert (ours / name).read_bytes() == (library / name).read_bytes(), name
    recorded = json.loads((ours / "rgsd-weights.json").read_text())["files"]  # every file, weights hashed as written
    assert {name: entry["sha256"] for name, entry in recorded.items()} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ours.iterdir()
        if p.name not in ("rgsd-weights.json", "_SUCCESS")}


def test_training_on_fixed_signals_halves_the_divergence(tiny_path):
    """A peaked synthetic teacher over 4 tokens; the student should move most of the way in 40 steps."""
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(8):
        ids = rng.integers(3, 1000, 24)
        positions = np.arange(8)
        top = np.stack([rng.choice(np.arange(3, 1000), 4, replace=False) for _ in positions])
        examples.append(synthetic_example(ids, 16, top, np.tile([0.7, 0.15, 0.1, 0.04], (len(positions), 1))))
    config = TrainConfig(batch_size=8, micro_batch_size=4, learning_rate=3e-3, epochs=40, clip="none")
    trainer = Trainer(load_model(tiny_path), examples, config, World(), pad_id=0)
    history = [trainer.step(s)["divergence"] for s in range(trainer.total_steps)]
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.slow
def test_train_writes_a_checkpoint_that_transformers_loads(scored, tmp_path):
    run = copy_run(scored, tmp_path / "run")
    out = cli("train", "--run", run, "--iteration", 0).stdout
    assert "6 steps" in out and "checkpoint in" in out
    checkpoint = run / "iter-000" / "checkpoint"
    assert (checkpoint / "_SUCCESS").exists() and (checkpoint / "chat_template.jinja").exists()
    metrics = [json.loads(line) for line in (run / "iter-000" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert {"loss", "divergence", "clip_fraction", "teacher_tail_mass", "student_tail_mass", "grad_norm", "lr",
            "tokens_per_s"} <= set(metrics[0])
    model = load_model(checkpoint)
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    base = load_file(model_path(run) / "model.safetensors")
    assert any(not torch.equal(base[name], tensor) for name, tensor in weights(run).items())
    assert "already complete" in cli("train", "--run", run, "--iteration", 0).stdout


def model_path(run):
    from rgsd_pipeline.models import resolve_model

    return resolve_model("builtin:tiny")


@pytest.mark.slow
def test_kill_during_training_then_resume_equals_uninterrupted(scored, tmp_path):
    reference, killed = copy_run(scored, tmp_path / "reference"), copy_run(scored, tmp_path / "killed")
    cli("train", "--run", reference, "--iteration", 0)
    state = killed / "iter-000" / "checkpoint" / "trainer_state" / "state.json"
    worker = subprocess.Popen([*__import__("helpers").CLI, "train", "--run", str(killed), "--iteration", "0"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not state.exists():
        time.sleep(0.01)
    worker.kill()
    worker.wait()
    assert state.exists() and not (killed / "iter-000" / "checkpoint" / "_SUCCESS").exists()
    resumed = cli("train", "--run", killed, "--iteration", 0).stdout
    assert "resuming at step" in resumed
    want, got = weights(reference), weights(killed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    lines = (killed / "iter-000" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))


def torchrun(run, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            "-m", "rgsd_pipeline", "train", "--run-dir", str(run), "--iteration", "0"]


@pytest.mark.slow
@pytest.mark.scale
@pytest.mark.parametrize("parallel, port", [("ddp", 29533), ("fsdp", 29534)])
def test_two_torchrun_processes_make_the_same_update_as_one(scored, tmp_path, parallel, port):
    one, two = copy_run(scored, tmp_path / "one"), copy_run(scored, tmp_path / "two", train__parallel=parallel)
    cli("train", "--run", one, "--iteration", 0)
    result = subprocess.run(torchrun(two, port), cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    want, got = weights(one), weights(two)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.scale
def test_fsdp_kill_then_resume_with_sharded_optimizer_equals_one_process(scored, tmp_path):
    one, killed = copy_run(scored, tmp_path / "one"), copy_run(scored, tmp_path / "killed", train__parallel="fsdp")
    cli("train", "--run", one, "--iteration", 0)
    state = killed / "iter-000" / "checkpoint" / "trainer_state" / "state.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(torchrun(killed, 29535), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    deadline = time.time() + 180
    while time.time() < deadline and not state.exists():
        time.sleep(0.01)
    import psutil

    for process in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]:
        process.kill()  # torchrun's workers do not share its process group
    worker.wait()
    saved = sorted(p.name for p in state.parent.iterdir())
    assert saved == ["optimizer-0-of-2.pt", "optimizer-1-of-2.pt", "state.json", "weights.safetensors"]
    lone = copy_run(killed, tmp_path / "lone")
    result = subprocess.run(torchrun(killed, 29536), cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step" in result.stdout
    want, got = weights(one), weights(killed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=0)
    # A sharded state is resumed only by as many processes as wrote it.
    refused = cli("train", "--run", lone, "--iteration", 0, check=False)
    assert refused.returncode == 2 and "holds the optimizer state of 2 process(es)" in refused.stderr


@pytest.mark.slow
def test_gradient_checkpointing_and_carried_optimizer(scored, tmp_path):
    plain = copy_run(scored, tmp_path / "plain")
    recomputed = copy_run(scored, tmp_path / "recomputed", train__gradient_checkpointing=True)
    cli("train", "--run", plain, "--iteration", 0)
    cli("train", "--run", recomputed, "--iteration", 0)
    want, got = weights(plain), weights(recomputed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)

    from rgsd_pipeline.trainer_state import find_state

    examples = [synthetic_example(np.arange(3, 19), 8, np.tile(np.arange(3, 7), (8, 1)), np.full((8, 4), 0.2))] * 4
    config = TrainConfig(batch_size=4, micro_batch_size=2, learning_rate=1e-3)
    first = Trainer(load_model(model_path(plain)), examples, config, World(), pad_id=0)
    second = Trainer(load_model(model_path(plain)), examples, config, World(), pad_id=0)
    second.load(find_state(plain / "iter-000" / "checkpoint"), load_weights=False)
    moments = [s["exp_avg"] for s in second.optimizer.state.values()]
    assert moments and all(m.abs().sum() > 0 for m in moments)  # carried over, not fresh
    assert not first.optimizer.state
    kept = zip(first.model.parameters(), second.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in kept)  # weights kept


@pytest.mark.slow
def test_lora_writes_a_merged_checkpoint(scored, tmp_path):
    run = copy_run(scored, tmp_path / "run", train__lora=True, train__lora_rank=4)
    cli("train", "--run", run, "--iteration", 0)
    checkpoint = run / "iter-000" / "checkpoint"
    merged = weights(run)
    base = load_file(model_path(run) / "model.safetensors")
    assert set(merged) == set(base)  # a plain model, no adapter names
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert changed and all("proj" in n for n in changed)
    load_model(checkpoint)
