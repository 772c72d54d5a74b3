"""Training examples: a rollout joined row by row with its teacher signals, and micro-batch collation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rgsd_pipeline.distill import Targets
from rgsd_pipeline.losses import position_weights
from rgsd_pipeline.shards import ArtifactError, StageData
from rgsd_pipeline.signals import decode_logprobs


@dataclass
class Example:
    input_ids: np.ndarray  # int64 [P + T]: the student prompt then the sampled response
    prompt_len: int
    positions: np.ndarray  # int64 [N]: response indices j in the loss (loss_mask true)
    topk_ids: np.ndarray  # int64 [N, K]
    topk_logprobs: np.ndarray  # float32 [N, K], decoded from storage
    tail_logprob: np.ndarray  # float32 [N], the teacher's exact log-mass outside its top-k
    token_logprob: np.ndarray  # float32 [N], the teacher's log-prob of the sampled token
    sampling_logprob: np.ndarray | None  # float32 [N], the behaviour policy's log-prob (None: not recorded)
    response_logprob: np.ndarray | None = None  # float32 [N], the engine's record of the policy's own (temperature
    # 1) log-prob, for the guard against stale weights (rollout_check.py)
    advantage: float = 0.0  # grpo: the rollout's group advantage
    old_logprob: np.ndarray | None = None  # float32 [N], grpo: the trainer's log-prob at the iteration's starting
    # weights (pi_old), kept by the trainer for the steps after the first


def synthetic_example(input_ids: np.ndarray, prompt_len: int, topk_ids_N_K: np.ndarray, topk_probs_N_K: np.ndarray,
                      token_logprob: float = -3.0) -> Example:
    """An example whose teacher puts `topk_probs` on `topk_ids` at every response position (the rest in the tail),
    sampled from the model's own distribution: for benchmarks and tests that need no rollout."""
    n = len(topk_ids_N_K)
    probs_N_K = np.asarray(topk_probs_N_K, dtype=np.float64)
    return Example(input_ids=np.asarray(input_ids, dtype=np.int64), prompt_len=prompt_len, positions=np.arange(n),
                   topk_ids=np.asarray(topk_ids_N_K, dtype=np.int64),
                   topk_logprobs=np.log(probs_N_K).astype(np.float32),
                   tail_logprob=np.log1p(-probs_N_K.sum(-1)).astype(np.float32),
                   token_logprob=np.full(n, token_logprob, np.float32), sampling_logprob=np.full(n, -2.0, np.float32))


def _aligned_rows(rollouts: StageData, graded: StageData, stage: str):
    """(rollout row, the graded stage's shard table, row index, "rollouts shard row i") for every row of two
    row-aligned outputs (signals or rewards beside rollouts), after checking shard counts, row counts and keys;
    `stage` writes `graded`."""
    if len(rollouts.files) != len(graded.files):
        raise ArtifactError(f"{graded.folder} has {len(graded.files)} shards but {rollouts.folder} has "
                            f"{len(rollouts.files)}; rerun `{stage}` for this iteration")
    for index in range(len(rollouts.files)):
        rollout_rows = rollouts.read_shard(index).to_pylist()
        table = graded.read_shard(index)
        if table.num_rows != len(rollout_rows):
            raise ArtifactError(f"{graded.files[index]} has {table.num_rows} rows, its rollouts shard "
                                f"{rollouts.files[index]} has {len(rollout_rows)}")
        keys = table.select(["prompt_id", "sample_idx"]).to_pylist()
        for row, (rollout, key) in enumerate(zip(rollout_rows, keys, strict=True)):
            if (key["prompt_id"], key["sample_idx"]) != (rollout["prompt_id"], rollout["sample_idx"]):
                raise ArtifactError(f"{graded.files[index]} row {row}: keys differ from {rollouts.files[index]}")
            yield rollout, table, row, f"{rollouts.files[index]} row {row}"


def load_examples(rollouts: StageData, signals: StageData | None, behaviour: bool = False,
                  rewards: StageData | None = None) -> list[Example]:
    """Every rollout with at least one token in the loss, in shard order; skipped rows are left out. With `signals`,
    the teacher's signals at the positions of its loss mask; with `rewards` (row-aligned too), its group advantage
    (policy_gradient.group_advantages over every rollout of the iteration) on each of those positions, every
    response token when there are no signals. A rollout without a reward then teaches through its signals alone
    (advantage 0), or not at all without signals. `behaviour`: the loss reads the behaviour log-probs, so a rollout
    without them is an error."""
    from rgsd_pipeline.policy_gradient import group_advantages

    advantage = {}
    if rewards is not None:
        keyed = [((rollout["prompt_id"], rollout["sample_idx"]), table.column("reward")[row].as_py())
                 for rollout, table, row, _ in _aligned_rows(rollouts, rewards, "reward")]
        advantage = dict(zip((key for key, _ in keyed),
                             group_advantages([key[0] for key, _ in keyed], [reward for _, reward in keyed]),
                             strict=True))
    rows = _aligned_rows(rollouts, signals, "score") if signals is not None else (
        (rollout, None, row, f"{rollouts.files[index]} row {row}") for index in range(len(rollouts.files))
        for row, rollout in enumerate(rollouts.read_shard(index).to_pylist()))
    examples = []
    for rollout, table, row, where in rows:
        key = (rollout["prompt_id"], rollout["sample_idx"])
        n = len(rollout["response_token_ids"])
        if table is None:  # rewards alone: every response token
            if advantage.get(key) is None or n == 0:
                continue
            positions = np.arange(n)
            teacher = {"topk_ids": np.zeros((n, 0), np.int64), "topk_logprobs": np.zeros((n, 0), np.float32),
                       "tail_logprob": np.zeros(n, np.float32), "token_logprob": np.zeros(n, np.float32)}
        else:
            signal = {name: table.column(name)[row] for name in table.column_names}
            if signal["status"].as_py() != "ok":
                continue
            mask = np.asarray(signal["loss_mask"].values, dtype=bool)
            if not mask.any():
                continue
            positions = np.nonzero(mask)[0]
            k = signal["topk_ids"].type.value_type.list_size
            ids = signal["topk_ids"].values.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
            values = signal["topk_logprobs"].values.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
            teacher = {"topk_ids": ids[positions].astype(np.int64), "topk_logprobs": decode_logprobs(values[positions]),
                       "tail_logprob": signal["tail_logprob"].values.to_numpy()[positions].astype(np.float32),
                       "token_logprob": signal["token_logprob"].values.to_numpy()[positions].astype(np.float32)}
        examples.append(Example(
            input_ids=np.asarray(rollout["prompt_token_ids"] + rollout["response_token_ids"], dtype=np.int64),
            prompt_len=len(rollout["prompt_token_ids"]), positions=positions, **teacher,
            sampling_logprob=_behaviour(rollout, where, behaviour, positions),
            response_logprob=np.asarray(rollout["response_logprobs"], dtype=np.float32)[positions],
            advantage=float(advantage.get(key) or 0.0)))
    return examples


def _behaviour(rollout: dict, where: str, required: bool, positions: np.ndarray) -> np.ndarray | None:
    """A rollout's behaviour log-probs at `positions`; None when the rollout did not record them."""
    if rollout["sampling_logprobs"] is None:
        if required:
            raise ArtifactError(f"{where}: sampling_logprobs is null (the rollout did not record the behaviour "
                                "log-probs) but this run's train.loss weights tokens by them; rerun `rollout` for "
                                "this iteration with this config (it records them for this loss)")
        return None
    return np.asarray(rollout["sampling_logprobs"], dtype=np.float32)[positions]


@dataclass
class MicroBatch:
    input_ids_B_T: torch.Tensor
    attention_mask_B_T: torch.Tensor
    rows_N: torch.Tensor  # batch row of each trained position
    columns_N: torch.Tensor  # column whose hidden state predicts it (prompt_len + j - 1)
    targets: Targets

    def to(self, device) -> MicroBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        targets = Targets(*(move(getattr(self.targets, f)) for f in self.targets.__dataclass_fields__))
        return MicroBatch(move(self.input_ids_B_T), move(self.attention_mask_B_T), move(self.rows_N),
                          move(self.columns_N), targets)


def collate(examples: list[Example], sequence_ids: list[int], reduction: str, num_tokens: int, num_sequences: int,
            pad_id: int, max_response_tokens: int = 0) -> MicroBatch:
    """Right-padded inputs and the flattened targets of a micro-batch.

    `sequence_ids` are the examples' indices within the global batch, and the denominators are the
    global batch's, so the micro-batch losses of all processes add up to the global batch's loss
    (`max_response_tokens`: the constant reduction's length, rollout.max_new_tokens).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids_B_T = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask_B_T = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids_B_T[row, :len(example.input_ids)] = torch.from_numpy(example.input_ids)
        mask_B_T[row, :len(example.input_ids)] = 1
    rows_N = torch.cat([torch.full((len(e.positions),), r) for r, e in enumerate(examples)])
    columns_N = torch.cat([torch.from_numpy(e.prompt_len + e.positions - 1) for e in examples])
    token_ids_N = input_ids_B_T[rows_N, columns_N + 1]
    sequence_N = torch.cat([torch.full((len(e.positions),), s) for s, e in zip(sequence_ids, examples, strict=True)])
    if reduction == "sequence":
        weight_N = position_weights(sequence_N - sequence_N.min(), "sequence", num_tokens, num_sequences)
    else:
        weight_N = position_weights(sequence_N, reduction, num_tokens, num_sequences, max_response_tokens)
    targets = Targets(
        topk_ids_N_K=torch.from_numpy(np.concatenate([e.topk_ids for e in examples])),
        teacher_topk_N_K=torch.from_numpy(np.concatenate([e.topk_logprobs for e in examples])),
        teacher_tail_N=torch.from_numpy(np.concatenate([e.tail_logprob for e in examples])),
        teacher_token_N=torch.from_numpy(np.concatenate([e.token_logprob for e in examples])),
        behaviour_token_N=None if any(e.sampling_logprob is None for e in examples) else
        torch.from_numpy(np.concatenate([e.sampling_logprob for e in examples])),
        token_ids_N=token_ids_N,
        weight_N=weight_N,
        old_token_N=None if any(e.old_logprob is None for e in examples) else
        torch.from_numpy(np.concatenate([e.old_logprob for e in examples])),
        advantage_N=torch.cat([torch.full((len(e.positions),), e.advantage, dtype=torch.float32) for e in examples]),
    )
    return MicroBatch(input_ids_B_T, mask_B_T, rows_N, columns_N, targets)
