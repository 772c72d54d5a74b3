"""Every shipped recipe runs as shipped: the paper-scale configs under torchrun, with only the model swapped for a tiny
one and the counts scaled down, every structural choice kept (FSDP2, bf16 engines and autocast, one optimizer step
per iteration, the shard rule, think masking, the trainer-state cadence), 3 iterations on 2 ranks, a rank killed at
a seeded random moment and the run resumed to the same files.

Multi-process runs: marked `scale` (`make test-scale`, which CI runs after `make test`).
"""

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, assert_equivalent_runs, stage_frame, torchrun_iterate

from rgsd_pipeline.config import load_config, to_dict

pytestmark = [pytest.mark.scale, pytest.mark.slow]
RECIPES = sorted((ROOT / "configs").glob("qwen*.yaml"))
ITERATIONS = 3
SEED = 20261207


def scaled_down(recipe: Path) -> list[str]:
    """Overrides that make a recipe run on a 2-core CPU: the tiny model of the same family (the thinking variant for a
    recipe that masks reasoning), the bundled data, fewer prompts and tokens. Engines are transformers on CPU ranks
    (a vLLM engine per rank would not fit 2 cores); nothing about the training structure changes."""
    config = load_config(recipe)
    model = "builtin:tiny-qwen3-thinking" if config.score.think_mask else "builtin:tiny-qwen2"
    return [f"model.path={model}", "model.max_model_len=1024", "data.sources=[builtin:medsci]", "data.format=auto",
            "data.max_prompts=32", "data.max_prompt_tokens=768", "rollout.max_new_tokens=32",
            "rollout.prompts_per_iteration=8", "train.batch_size=8", "engine.kind=hf", "engine.score_kind=hf",
            "train.learning_rate=1e-4"]


def structure(recipe: Path) -> str:
    """What a scaled-down recipe runs, without its name: recipes equal in this run the same thing."""
    resolved = to_dict(load_config(recipe, scaled_down(recipe)))
    resolved.pop("name")
    return json.dumps(resolved, sort_keys=True)


def distinct_recipes() -> list[Path]:
    """One recipe for each distinct scaled-down run (the 3B and 7B recipes differ in model and data alone)."""
    seen: dict[str, Path] = {}
    for recipe in RECIPES:
        seen.setdefault(structure(recipe), recipe)
    return list(seen.values())


def test_every_recipe_is_one_of_the_runs_below():
    assert len(RECIPES) == 6
    tested = {structure(r) for r in distinct_recipes()}
    assert all(structure(r) in tested for r in RECIPES)
    # the structure is the recipe's own
    for recipe in RECIPES:
        config = load_config(recipe, scaled_down(recipe))
        assert config.train.parallel == "fsdp" and config.train.bf16 and config.model.dtype == "bfloat16"
        assert config.data.rows_per_shard == load_config(recipe).data.rows_per_shard  # one shard of 2000 rows...


@pytest.mark.parametrize("recipe", distinct_recipes(), ids=lambda p: p.stem)
def test_the_recipe_runs_under_torchrun_and_resumes_after_a_rank_is_killed(recipe, tmp_path):
    port = 29650 + 4 * RECIPES.index(recipe)
    reference = tmp_path / "reference"
    started = time.perf_counter()
    result = subprocess.run(torchrun_iterate(recipe, reference, port, ITERATIONS, scaled_down(recipe)), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    duration = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert f"{ITERATIONS} iteration(s) complete" in result.stdout
    for i in range(ITERATIONS):  # ... cut so that each rank samples and scores a shard of its own
        locks = sorted(p.name for p in (reference / f"iter-{i:03d}" / "rollouts" / ".progress").glob("lock-*-of-*"))
        assert locks == ["lock-0-of-2", "lock-1-of-2"], locks
        steps = [json.loads(line) for line in (reference / f"iter-{i:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 1 and steps[0]["global_step"] == i + 1  # one optimizer step per iteration
    if load_config(recipe).score.think_mask:  # the template opens the reasoning span: it is left out of the loss
        masks = [m for i in range(ITERATIONS) for m in stage_frame(reference, i, "signals")["loss_mask"].to_list()]
        assert any(not any(m) for m in masks) and any(any(m) and not all(m) for m in masks)

    killed = tmp_path / "killed"
    job = subprocess.Popen(torchrun_iterate(recipe, killed, port + 1, ITERATIONS, scaled_down(recipe)), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    moment = random.Random(f"{SEED}-{recipe.stem}").uniform(0.35, 0.85) * duration
    time.sleep(moment)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert ranks, f"rank 1 was not running {moment:.1f} s in"
    ranks[0].send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0 and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    result = subprocess.run(torchrun_iterate(recipe, killed, port + 2, ITERATIONS, scaled_down(recipe)), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert_equivalent_runs(killed, reference, ITERATIONS, weights_atol=0)
    assert not list(killed.rglob(".*.tmp-*"))
