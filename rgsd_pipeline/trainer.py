"""The training loop: optimizer steps over global batches, exact resume, and data-parallel processes.

Precision: the trainable weights and the AdamW state are kept in train.master_dtype (fp32 by default)
whatever dtype the engines run in (model.dtype, bf16 in the paper-scale recipes); compute may run under
bf16 autocast (train.bf16). At the recipes' learning rate of 1e-6 an update is far below bf16's spacing
near typical weights (about 1.6e-4 at 0.02), so bf16 weights updated in place would barely move. The
checkpoint the next rollout loads is exported in model.dtype; the next iteration continues from the fp32
weights kept in the trainer state.

Schedule: warmup and decay follow the run's global step (every iteration's steps counted), so an
iteration of one optimizer step does not restart warmup; AdamW moments carry across iterations by default.

Every process knows the whole data order (a seeded permutation per epoch), so the global batch of
step s is the same everywhere; process r takes its sequences r, r + W, ... Loss denominators are the
global batch's, and gradients are summed across processes, so W processes make exactly the update
one process makes with the same global batch (up to float summation order).

With `train.parallel=fsdp` (FSDP2), each decoder layer and the rest of the model (embeddings, final
norm, a tied or untied LM head) are sharded across the processes; gradients are reduce-scattered
instead of summed in full, and the optimizer state lives only as shards. The update is the same.

Trainer state (trainable weights, optimizer, step, RNG) is saved every `save_every` steps under
checkpoint/trainer_state/ (rgsd_pipeline/trainer_state.py: safetensors and weights_only torch files, one
optimizer file per process under FSDP2), in the background while the next steps compute; a killed run
resumes from it and reaches the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rgsd_pipeline.config import TrainConfig
from rgsd_pipeline.distill import LossSpec, distill_loss, fp32_logits
from rgsd_pipeline.distributed import World, device, init_world  # noqa: F401 (the trainer's world)
from rgsd_pipeline.examples import Example, collate
from rgsd_pipeline.trainer_state import load_state, save_state, trainable, wait_for_writes


def learning_rate(global_step: int, horizon: int, config: TrainConfig) -> float:
    """Linear warmup over the run's first steps, then constant or cosine decay to min_lr_ratio of the peak at
    `horizon` (and flat after it)."""
    peak = config.learning_rate
    if global_step < config.warmup_steps:
        return peak * (global_step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    progress = min((global_step - config.warmup_steps) / max(horizon - config.warmup_steps, 1), 1.0)
    return peak * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_order(num_examples: int, batch_size: int, epochs: int, seed: int, iteration: int = 0) -> list[list[int]]:
    """The global batches of every step: a seeded permutation per (iteration, epoch), cut into batch_size pieces."""
    batches = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, iteration, epoch]).permutation(num_examples).tolist()
        batches += [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    return batches


def micro_batches(indices: list[int], lengths: dict[int, int], size: int) -> list[list[int]]:
    """A process's share of a global batch as micro-batches of `size`, longest sequences first, so that sequences
    of similar length are padded together. Each micro-batch's loss is its share of the global batch's sum, so the
    order changes the gradient only by float rounding."""
    ordered = sorted(indices, key=lambda i: -lengths[i])
    return [ordered[lo:lo + size] for lo in range(0, len(ordered), size)]


def passes_per_rank(batch_size: int, ranks: int, micro_batch_size: int) -> int:
    """Forward-backward passes each of `ranks` processes makes on a global batch of `batch_size` sequences: those of
    rank 0, whose share (sequences 0, W, 2W, ...) is the largest."""
    return math.ceil(math.ceil(batch_size / ranks) / micro_batch_size)


class DistillForward(torch.nn.Module):
    """The loss of one micro-batch: decoder, then the chunked LM head and distillation loss.

    One module owns the whole forward so that FSDP2 can make it the root unit: embeddings, final norm
    and the LM head (tied to the embeddings or not) are gathered for the forward and the backward."""

    def __init__(self, model, spec: LossSpec, chunk_positions: int):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
        self._parts = (base.get_decoder(), base.get_output_embeddings())  # a tuple: not registered twice
        self.spec, self.chunk_positions = spec, chunk_positions

    def forward(self, micro, token_logprobs: bool = False):
        """(loss, stats) of the micro-batch; with `token_logprobs`, the sampled tokens' fp32 log-probs instead (no
        loss), through the same module so that FSDP2 gathers what it gathers for the loss."""
        decoder, lm_head = self._parts
        if token_logprobs:
            return sampled_token_logprobs(decoder, lm_head, micro, self.chunk_positions)
        hidden_B_T_H = decoder(input_ids=micro.input_ids_B_T, attention_mask=micro.attention_mask_B_T).last_hidden_state
        hidden_N_H = hidden_B_T_H[micro.rows_N, micro.columns_N]
        return distill_loss(hidden_N_H, lm_head, micro.targets, self.spec, self.chunk_positions)


@torch.no_grad()
def sampled_token_logprobs(decoder, lm_head, micro, chunk_positions: int) -> torch.Tensor:
    """[N] fp32 log-prob of the sampled token at each of a micro-batch's trained positions, the LM head applied
    chunk by chunk in fp32 as the loss applies it (the caller sets the decoder's autocast)."""
    hidden_B_T_H = decoder(input_ids=micro.input_ids_B_T, attention_mask=micro.attention_mask_B_T).last_hidden_state
    hidden_N_H = hidden_B_T_H[micro.rows_N, micro.columns_N]
    tokens_N = micro.targets.token_ids_N
    chunks = [slice(lo, lo + chunk_positions) for lo in range(0, len(tokens_N), chunk_positions)]
    return torch.cat([fp32_logits(hidden_N_H[c], lm_head.weight, lm_head.bias).log_softmax(-1)
                      .gather(-1, tokens_N[c, None])[:, 0] for c in chunks])


def shard(forward: DistillForward, device_type: str, world: World, bf16: bool) -> None:
    """FSDP2: each decoder layer its own unit, the rest of the model the root unit. With bf16, the layers' parameters
    are gathered in bf16 for compute while the sharded master weights, gradients and their reduction stay fp32; the
    root unit (embeddings, final norm, LM head) is gathered in fp32, since the loss computes the LM head in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world.size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    decoder, _ = forward._parts
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The chunked LM head is recomputed in backward, so the root unit keeps its parameters gathered.
    fully_shard(forward, mesh=mesh, reshard_after_forward=False, mp_policy=MixedPrecisionPolicy())


class Trainer:
    """Optimizer steps of one iteration over its examples: the model, the loss, AdamW and the step schedule.

    `first_global_step` is the run's step count before this iteration and `horizon` the length of the
    learning-rate schedule in global steps (see learning_rate). `optimizer`, when given, is the previous
    iteration's AdamW over the same model (kept in memory by a resident `iterate`). `reference`, for a loss with a
    KL term (grpo with train.kl_coef), is the frozen base model whose log-probs the KL term compares with, run under
    the policy's autocast. `max_response_tokens` is rollout.max_new_tokens (train.reduction=constant). `forward`, the
    previous iteration's loss module around the same model (kept by a resident run), is reused: FSDP2 shards a module
    once.
    """

    def __init__(self, model, examples: list[Example], config: TrainConfig, world: World, pad_id: int,
                 iteration: int = 0, first_global_step: int = 0, horizon: int = 0, optimizer=None, reference=None,
                 max_response_tokens: int = 0, forward: DistillForward | None = None):
        self.device = device()
        self.model = model.to(self.device)
        self.reference = reference.to(self.device).eval() if reference is not None else None
        self.examples, self.config, self.world, self.pad_id = examples, config, world, pad_id
        self.first_global_step = first_global_step
        self.spec = LossSpec.of(config)
        self.objective = self.spec.objective
        self.max_response_tokens = max_response_tokens
        self.batches = batch_order(len(examples), config.batch_size, config.epochs, config.seed, iteration)
        self.horizon = horizon or first_global_step + len(self.batches)
        self.sharded = config.parallel == "fsdp" and world.size > 1
        if forward is not None and forward.model is model:  # kept by a resident run: sharded once, at its start
            self.forward = forward
        else:
            self.forward = DistillForward(self.model, self.spec, config.chunk_positions)
            if self.sharded:
                shard(self.forward, self.device.type, world, config.bf16)
        # Set by the caller for an iteration's first step (rollout_check.py): the rollouts' recorded log-probs against
        # the trainer's, before the first update.
        self.rollout_check = None
        # A resident process passes the previous iteration's optimizer: its moments continue, as after a reload.
        self.optimizer = optimizer or torch.optim.AdamW(list(trainable(model).values()), lr=config.learning_rate,
                                                        weight_decay=config.weight_decay)

    def autocast(self):
        """The autocast every forward of this trainer runs under (train.bf16)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def reference_logprobs(self, micro) -> torch.Tensor:
        """The frozen reference model's fp32 log-prob of each sampled token, under the policy's autocast: at equal
        weights it computes exactly what the policy computes, so the KL to it is 0."""
        with self.autocast():
            return sampled_token_logprobs(self.reference.get_decoder(), self.reference.get_output_embeddings(), micro,
                                          self.config.chunk_positions)

    def keep_old_logprobs(self) -> None:
        """pi_old for a loss that reads it (objectives: needs_old_logprobs): each sampled token's log-prob under the
        weights the model holds now, the iteration's starting ones, for every example a step after the first
        trains on (the first step's pi_old is its own forward, detached). Called before any optimizer step, by
        every process for its own share (the same micro-batches as the steps, so FSDP2's collectives match)."""
        if not self.objective.needs_old_logprobs or len(self.batches) < 2:
            return
        self.model.eval()
        for step in range(1, len(self.batches)):
            batch = self.batches[step]
            for indices, filler in self._passes(batch):
                todo = [i for i in indices if self.examples[i].old_logprob is None]
                if not todo and not self.sharded:
                    continue
                micro = self._collate(indices, batch, 1)
                with self.autocast():
                    logprobs_N = self.forward(micro, token_logprobs=True).float().cpu().numpy()
                if filler:
                    continue
                offsets = np.cumsum([0] + [len(self.examples[i].positions) for i in indices])
                for index, lo, hi in zip(indices, offsets[:-1], offsets[1:], strict=True):
                    if self.examples[index].old_logprob is None:
                        self.examples[index].old_logprob = logprobs_N[lo:hi].astype(np.float32)

    def _passes(self, batch: list[int]) -> list[tuple[list[int], bool]]:
        """This rank's micro-batches of global batch `batch`, as (indices, filler). Under FSDP2 every forward and
        backward is a collective, so every rank makes as many passes as rank 0: a rank with fewer sequences (a batch
        that does not divide, rollouts masked out) adds filler passes over the batch's shortest sequence, which count
        0."""
        world, size = self.world, self.config.micro_batch_size
        lengths = {i: len(self.examples[i].input_ids) for i in batch}
        plan = micro_batches(batch[world.rank::world.size], lengths, size)
        fillers = passes_per_rank(len(batch), world.size, size) - len(plan) if self.sharded else 0
        return [(indices, False) for indices in plan] + [([min(batch, key=lengths.__getitem__)], True)] * fillers

    def recorded_logprobs(self, indices: list[int]) -> torch.Tensor | None:
        """The log-probs the rollout engine recorded for the trained tokens of examples `indices` (None if any lacks
        them), for the guard against stale weights (rollout_check.py)."""
        recorded = [self.examples[i].response_logprob for i in indices]
        return None if any(r is None for r in recorded) else torch.from_numpy(np.concatenate(recorded))

    def _collate(self, indices: list[int], batch: list[int], num_tokens: int):
        """The micro-batch of examples `indices` of global batch `batch`, on the trainer's device."""
        return collate([self.examples[i] for i in indices], [batch.index(i) for i in indices], self.config.reduction,
                       num_tokens, len(batch), self.pad_id, self.max_response_tokens).to(self.device)

    def save(self, folder: Path, step: int, background: bool = False) -> None:
        """Trainer state after `step` steps of this iteration; with `background`, written while the next steps run."""
        save_state(folder, self.model, self.optimizer, step, self.world, self.sharded, self.first_global_step + step,
                   background)

    def load(self, folder: Path, load_weights: bool = True, load_optimizer: bool = True) -> int:
        return load_state(folder, self.model, self.optimizer, load_weights, self.world, self.sharded, load_optimizer)

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    def step(self, step: int) -> dict:
        """One optimizer step on global batch `step`; returns its metrics (identical on every process)."""
        config, world = self.config, self.world
        started = time.perf_counter()
        global_step = self.first_global_step + step
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(global_step, self.horizon, config)
        batch = self.batches[step]
        num_tokens = sum(len(self.examples[i].positions) for i in batch)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        totals = torch.zeros(1 + len(self.objective.stats), device=self.device)  # the loss, then the loss's stats
        for indices, filler in self._passes(batch):
            micro = self._collate(indices, batch, num_tokens)
            if step == 0:  # pi_old is the current policy itself: its own forward, detached (objectives)
                micro.targets.old_token_N = None
            if self.reference is not None:
                micro.targets.reference_token_N = self.reference_logprobs(micro)
            # The decoder runs under autocast; the LM head and the loss run in fp32 (distill.py).
            with self.autocast():
                loss, stats, student_token_N = self.forward(micro)
            if self.rollout_check is not None and not filler:
                self.rollout_check.observe(student_token_N, self.recorded_logprobs(indices))
            # FSDP2 averages the gradients it reduce-scatters; the loss is a share of a global-batch sum.
            (loss * (0.0 if filler else world.size if self.sharded else 1.0)).backward()
            if not filler:
                totals += torch.cat([loss.detach().reshape(1), stats])
        # Before anything is updated: were these rollouts sampled from the weights being trained (rollout_check.py)?
        checked = self.rollout_check.verdict(world, self.device) if self.rollout_check is not None else {}
        self.rollout_check = None
        params = [p for p in trainable(self.model).values()]
        if world.size > 1:
            if not self.sharded:
                for param in params:
                    if param.grad is None:  # a rank with no sequence in this step (before any backward of its own)
                        param.grad = torch.zeros_like(param)
                    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        wait_for_writes()  # a state being saved from these tensors must be on disk before they change
        self.optimizer.step()
        elapsed = time.perf_counter() - started
        loss, *sums = totals.tolist()
        measured = self.objective.metrics(dict(zip(self.objective.stats, sums, strict=True)), num_tokens)
        processed = sum(len(self.examples[i].input_ids) for i in batch)
        return {"step": step + 1, "global_step": global_step + 1, "loss": loss, **measured,
                "grad_norm": float(grad_norm), "lr": self.optimizer.param_groups[0]["lr"], "sequences": len(batch),
                "loss_tokens": num_tokens, "tokens_per_s": processed / elapsed, **checked}
