"""The on-policy cadence (which prompts each iteration samples) and the per-sample seeds."""

from collections import Counter

from rgsd_pipeline.config import RolloutConfig, TrainConfig
from rgsd_pipeline.sampling import (
    iteration_prompts,
    iterations_per_epoch,
    optimizer_steps_per_epoch,
    sample_seed,
    slice_sizes,
)

PROMPTS = [{"prompt_id": f"p{i:03d}"} for i in range(23)]


def ids(prompts):
    return [p["prompt_id"] for p in prompts]


def test_every_prompt_is_sampled_exactly_once_per_epoch():
    per_epoch = iterations_per_epoch(len(PROMPTS), 5)
    assert per_epoch == 5 and slice_sizes(len(PROMPTS), 5) == [5, 5, 5, 5, 3]
    epochs = [[ids(iteration_prompts(PROMPTS, e * per_epoch + s, 5, seed=7)) for s in range(per_epoch)]
              for e in range(3)]
    for slices in epochs:
        assert Counter(p for piece in slices for p in piece) == Counter(ids(PROMPTS))  # once each, none missing
    assert epochs[0] != epochs[1] != epochs[2]  # a new order per epoch
    assert iteration_prompts(PROMPTS, 7, 5, seed=7) == iteration_prompts(list(reversed(PROMPTS)), 7, 5, seed=7)
    assert ids(iteration_prompts(PROMPTS, 0, 5, seed=8)) != epochs[0][0]  # the seed matters


def test_zero_or_a_slice_as_large_as_the_data_takes_every_prompt():
    assert iteration_prompts(PROMPTS, 4, 0, seed=0) == PROMPTS
    assert iteration_prompts(PROMPTS, 4, 100, seed=0) == PROMPTS
    assert iterations_per_epoch(len(PROMPTS), 0) == 1


def test_steps_per_epoch_count_every_slice():
    rollout, train = RolloutConfig(prompts_per_iteration=5, samples_per_prompt=2), TrainConfig(batch_size=4, epochs=1)
    assert optimizer_steps_per_epoch(23, rollout, train) == 4 * 3 + 2  # 10 rollouts -> 3 steps; the last 6 -> 2


def test_seeds_depend_on_the_round_prompt_and_sample_only():
    seed = sample_seed(0, "p001", 0, seed_round=3)
    assert seed == sample_seed(0, "p001", 0, seed_round=3) and 0 <= seed < 2**31
    assert len({seed, sample_seed(0, "p001", 1, seed_round=3), sample_seed(0, "p001", 0, seed_round=4),
                sample_seed(1, "p001", 0, seed_round=3), sample_seed(0, "p002", 0, seed_round=3)}) == 5
