"""Trainer state written in the background: what a save holds, what pruning keeps, and kill -9 while a state is written.

The resident `iterate` exports a checkpoint while its trainer state is still being written; a kill in that
window leaves a complete checkpoint without its final state (or with an earlier step's). The next iteration
trains that one again from its signals, and the run ends as an uninterrupted one does.
"""

import json
import os
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from helpers import CLI, cli, kill_when
from safetensors.torch import load_file
from test_iterate import assert_same_run

from rgsd_pipeline import trainer_state
from rgsd_pipeline.config import TrainConfig
from rgsd_pipeline.distributed import World
from rgsd_pipeline.examples import synthetic_example
from rgsd_pipeline.models import load_model
from rgsd_pipeline.shards import ArtifactError
from rgsd_pipeline.trainer import Trainer
from rgsd_pipeline.trainer_state import final_state, find_state, prune_states, state_global_step, wait_for_writes


def test_a_state_written_in_the_background_holds_its_step_although_the_next_step_follows_at_once(
        tiny_path, tmp_path, monkeypatch):
    examples = [synthetic_example(np.arange(3, 19), 8, np.tile(np.arange(3, 7), (8, 1)), np.full((8, 4), 0.2))] * 4
    trainer = Trainer(load_model(tiny_path), examples,
                      TrainConfig(batch_size=2, micro_batch_size=2, learning_rate=1e-2), World(), pad_id=0)
    trainer.step(0)
    after_first = {name: p.detach().clone() for name, p in trainer_state.trainable(trainer.model).items()}
    write = trainer_state._write

    def slow_write(*args):
        time.sleep(1.0)  # the next step's forward, backward and update would land inside the write
        write(*args)

    monkeypatch.setattr(trainer_state, "_write", slow_write)
    trainer.save(tmp_path / "trainer_state", 1, background=True)
    trainer.step(1)
    wait_for_writes()
    saved = load_file(tmp_path / "trainer_state" / "weights.safetensors")
    now = trainer_state.trainable(trainer.model)
    # The second step moved the weights ...
    assert any(not torch.equal(now[name], want) for name, want in after_first.items())
    for name, tensor in after_first.items():
        assert torch.equal(saved[name], tensor), name  # ... after the state of the first was on disk


def test_a_background_write_that_fails_is_reported_by_the_next_wait_naming_the_state(tiny_path, tmp_path):
    examples = [synthetic_example(np.arange(3, 19), 8, np.tile(np.arange(3, 7), (8, 1)), np.full((8, 4), 0.2))] * 2
    trainer = Trainer(load_model(tiny_path), examples, TrainConfig(batch_size=2, micro_batch_size=2), World(), pad_id=0)
    (tmp_path / "not-a-folder").write_text("")
    folder = tmp_path / "not-a-folder" / "trainer_state"
    trainer.save(folder, 1, background=True)
    with pytest.raises(ArtifactError, match=f"writing the trainer state {folder} \\(step 1\\) failed"):
        wait_for_writes()
    wait_for_writes()  # reported once


def test_a_held_write_starts_once_the_engine_has_the_weights_or_once_it_is_waited_for(tiny_path, tmp_path):
    """A resident run holds the final state's write while the student's engine takes the new weights
    (training.export_policy, ResidentEngines.student); waiting for the writes opens the hold too, so that nothing
    waits on a hold that no engine will open."""
    from rgsd_pipeline.engines.hosting import ResidentEngines

    examples = [synthetic_example(np.arange(3, 19), 8, np.tile(np.arange(3, 7), (8, 1)), np.full((8, 4), 0.2))] * 2
    trainer = Trainer(load_model(tiny_path), examples, TrainConfig(batch_size=2, micro_batch_size=2), World(), pad_id=0)

    def held_write(name):
        folder = tmp_path / name / "trainer_state"
        trainer_state.hold_writes()
        trainer.save(folder, 1, background=True)
        time.sleep(1.0)
        assert not folder.exists()
        return folder

    class Student:
        model_path, in_process = "policy-0", True

        def __init__(self, state):
            self.state = state

        def wake_up(self):
            pass

        def load_weights(self, policy, weights):
            self.model_path, self.written_while_loading = policy, self.state.exists()

    folder = held_write("opened-by-the-engine")
    engines = ResidentEngines()
    engines._student = student = Student(folder)
    engines.student(tmp_path / "policy-1", None)
    assert student.written_while_loading is False
    deadline = time.time() + trainer_state.HOLD_SECONDS / 2  # opened by the engine, not by the hold's limit
    while not folder.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert folder.exists()
    wait_for_writes()

    folder = held_write("opened-by-a-wait")
    wait_for_writes()
    assert folder.exists()


def fake_state(run, iteration, state_step, exported_step):
    """A checkpoint exported at global step `exported_step` with a trainer state saved at `state_step`."""
    checkpoint = run / f"iter-{iteration:03d}" / "checkpoint"
    (checkpoint / "trainer_state").mkdir(parents=True)
    (checkpoint / "trainer_state" / "state.json").write_text(json.dumps({"step": 1, "global_step": state_step}))
    (checkpoint / "rgsd.json").write_text(json.dumps({"global_step": exported_step}))
    return checkpoint


def test_pruning_keeps_the_last_final_state_until_a_newer_one_is_whole(tmp_path):
    """keep_states=1: while iteration 2's final state is being written (only its first step's state is on disk),
    iteration 1's stays, so iteration 2 can be trained again from either."""
    for iteration in (0, 1):
        fake_state(tmp_path, iteration, iteration + 1, iteration + 1)
    newest = fake_state(tmp_path, 2, 3, 4)  # two steps, the state of the first on disk
    assert final_state(newest) is None and find_state(newest) is not None
    assert prune_states(tmp_path, 2, keep=1) == [tmp_path / "iter-000" / "checkpoint" / "trainer_state"]
    assert final_state(tmp_path / "iter-001" / "checkpoint") is not None
    (newest / "trainer_state" / "state.json").write_text(json.dumps({"step": 2, "global_step": 4}))
    assert prune_states(tmp_path, 2, keep=1) == [tmp_path / "iter-001" / "checkpoint" / "trainer_state"]
    assert state_global_step(final_state(newest)) == 4
    assert prune_states(tmp_path, 2, keep=0) == []


# Run `iterate` with every background write of a final trainer state (the save at the iteration's last step) stopped
# after its optimizer file, as if the machine were slow to write it; the test kills the process in that window. The
# next iteration's training does not wait for that write before its optimizer step: once it waits there, the file
# named by argv[2] appears.
STALLED_FINAL_WRITE = """
import sys, time
from pathlib import Path
import torch
from rgsd_pipeline import trainer, trainer_state
from rgsd_pipeline.cli import main

write, wait = trainer_state._write, trainer.wait_for_writes

def stalled(folder, tmp, weights, bundle, state):
    if state["step"] < int(sys.argv[1]):
        return write(folder, tmp, weights, bundle, state)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, tmp / "optimizer.pt")
    time.sleep(600)

def waited_in_step():
    if trainer_state._pending is not None and not trainer_state._pending.done():
        Path(sys.argv[2]).touch()
    wait()

trainer_state._write, trainer.wait_for_writes = stalled, waited_in_step
main(sys.argv[3:])
"""


def killed_while_writing_the_final_state(config, run, steps_per_iteration, in_next_training=False):
    """Start `iterate`, SIGKILL it once iteration 0's checkpoint is complete and its final state half written (and,
    `in_next_training`, once iteration 1's training has run up to its optimizer step, which waits for that write)."""
    checkpoint = run / "iter-000" / "checkpoint"
    half, waiting = checkpoint / ".trainer_state.tmp" / "optimizer.pt", run.parent / f"{run.name}-waiting-in-step"

    def ready():
        return (checkpoint / "_SUCCESS").exists() and half.exists() and (waiting.exists() or not in_next_training)

    kill_when([sys.executable, "-c", STALLED_FINAL_WRITE, steps_per_iteration, waiting, "iterate", "--config",
               config, "--run", run, "--iterations", 2], ready)
    assert ready()
    return final_state(checkpoint)


@pytest.fixture(scope="module")
def two_steps_config(small_config, tmp_path_factory):
    """The small config with two optimizer steps per iteration (a trainer state after each)."""
    config = yaml.safe_load(small_config.read_text())
    config["train"].update(batch_size=4, micro_batch_size=4)
    path = tmp_path_factory.mktemp("config") / "two-steps.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_iteration, in_next_training", [(1, False), (2, False), (1, True)],
                         ids=["no-state-on-disk", "an-earlier-step-on-disk", "killed-in-the-next-training"])
def test_killed_while_the_final_state_is_written_then_rerun_gives_the_same_run(
        steps_per_iteration, in_next_training, small_config, two_steps_config, two_iterations, tmp_path):
    """One step per iteration: the kill leaves iteration 0's checkpoint without a trainer state; iteration 1 trains
    iteration 0 again from the base model. Two: the state of its first step is on disk; the replay resumes there.
    In the next training: iteration 1 trains beside that write, and the kill lands where its update waits for it."""
    config = small_config if steps_per_iteration == 1 else two_steps_config
    reference = two_iterations
    if steps_per_iteration == 2:
        reference = tmp_path / "uninterrupted"
        cli("iterate", "--config", config, "--run", reference, "--iterations", 2)
    run = tmp_path / "killed"
    assert killed_while_writing_the_final_state(config, run, steps_per_iteration, in_next_training) is None
    on_disk = find_state(run / "iter-000" / "checkpoint")
    assert (on_disk is None) == (steps_per_iteration == 1)
    result = cli("iterate", "--run", run, "--iterations", 2)
    assert "training iteration 0 again from its signals" in result.stderr, result.stderr[-2000:]
    assert "bit for bit" not in result.stderr  # the replay reproduced the checkpoint exactly
    assert_same_run(run, reference)
    for iteration in (0, 1):
        state = final_state(run / f"iter-{iteration:03d}" / "checkpoint")
        assert state_global_step(state) == steps_per_iteration * (iteration + 1)
        want = load_file(find_state(reference / f"iter-{iteration:03d}" / "checkpoint") / "weights.safetensors")
        got = load_file(state / "weights.safetensors")
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0)
    metrics = [json.loads(line) for line in (run / "iter-000" / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in metrics] == list(range(1, steps_per_iteration + 1))  # written once
    assert not list(run.rglob(".*.tmp"))


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_the_writer_thread_runs_at_the_lowest_priority_and_this_thread_does_not():
    """The background write must not take cores from the rollout it overlaps (trainer_state._yield_to_the_work)."""
    import threading

    def own_priority():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert trainer_state._writer.submit(own_priority).result() == 19
    assert own_priority() < 19


@pytest.mark.slow
def test_states_written_every_few_iterations_a_kill_between_them_replays_the_iterations_since(small_config, tmp_path):
    """train.state_every_iterations=3: iterations 0 and 1 keep their final trainer states in memory only. A kill once
    iteration 1's checkpoint is complete leaves no state on disk; the rerun trains iterations 0 and 1 again from their
    signals, then iteration 2, and the run ends as an uninterrupted one does."""
    every = "train.state_every_iterations=3"
    reference = tmp_path / "uninterrupted"
    cli("iterate", "--config", small_config, "--run", reference, "--iterations", 3, every)
    assert [find_state(reference / f"iter-{i:03d}" / "checkpoint") is None for i in range(3)] == [True, True, False]
    run = tmp_path / "killed"
    done = run / "iter-001" / "checkpoint" / "_SUCCESS"
    kill_when([*CLI, "iterate", "--config", small_config, "--run", run, "--iterations", 3, every], done.exists)
    assert done.exists() and not (run / "iter-002" / "checkpoint" / "_SUCCESS").exists()
    assert find_state(run / "iter-000" / "checkpoint") is None and find_state(run / "iter-001" / "checkpoint") is None
    result = cli("iterate", "--run", run, "--iterations", 3)
    assert "training iteration 1 again from its signals" in result.stderr, result.stderr[-2000:]
    assert "training iteration 0 again from its signals" in result.stderr, result.stderr[-2000:]
    assert "bit for bit" not in result.stderr  # each replay reproduced its checkpoint exactly
    assert_same_run(run, reference, iterations=3)
    for iteration in range(3):
        metrics = (run / f"iter-{iteration:03d}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["global_step"] for line in metrics] == [iteration + 1]  # written once
    assert state_global_step(final_state(run / "iter-002" / "checkpoint")) == 3


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["weights.safetensors", "optimizer.pt"])
def test_a_state_is_verified_against_the_checksums_taken_while_it_was_written(tmp_path, damaged):
    """A flipped bit in either file is refused by name before anything is loaded; the intact state loads."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    state = tmp_path / "trainer_state"
    trainer_state.save_state(state, model, optimizer, step=2)
    files = json.loads((state / "state.json").read_text())["files"]
    assert set(files) == {"weights.safetensors", "optimizer.pt"}
    assert files["weights.safetensors"]["sha256"] == __import__("hashlib").sha256(
        (state / "weights.safetensors").read_bytes()).hexdigest()
    fresh = torch.nn.Linear(4, 3)
    assert trainer_state.load_state(state, fresh, torch.optim.AdamW(fresh.parameters())) == 2
    torch.testing.assert_close(fresh.weight, model.weight, atol=0, rtol=0)
    _flip(state / damaged, (state / damaged).stat().st_size - 9)
    before = fresh.weight.detach().clone()
    with pytest.raises(ArtifactError, match=f"{state / damaged} does not match its checksum"):
        trainer_state.load_state(state, fresh, torch.optim.AdamW(fresh.parameters()))
    if damaged == "weights.safetensors":
        assert torch.equal(fresh.weight, before)  # nothing of it was loaded
    (state / "state.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="state.json cannot be read"):
        trainer_state.state_global_step(state)


def test_a_second_writer_of_a_trainer_state_is_refused_by_its_lock(tmp_path):
    from rgsd_pipeline import layout
    from rgsd_pipeline.shards import LockedError, exclusive_lock

    model = torch.nn.Linear(2, 2)
    state = tmp_path / "checkpoint" / "trainer_state"
    with exclusive_lock(layout.trainer_state_lock(state), "held by the test"):
        with pytest.raises(LockedError, match="is being written by another process"):
            trainer_state.save_state(state, model, torch.optim.AdamW(model.parameters()), step=1)
    trainer_state.save_state(state, model, torch.optim.AdamW(model.parameters()), step=1)
    assert find_state(tmp_path / "checkpoint") == state
