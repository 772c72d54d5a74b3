"""What one GPU holds in a resident `iterate`, estimated from the model's config.json before anything loads.

Per GPU, in bytes (P parameters, F ranks sharing the FSDP2 shards, b = bytes per weight in model.dtype):

    trainer     P * 16 / F      fp32 master weights (4) + gradients (4) + AdamW moments (8), sharded by FSDP2
                                (DDP: F = 1, every rank holds all of it); bf16 master weights: 8
    gathered    b * (root + 2 layers)   what FSDP2 gathers for compute: embeddings, head and norms (the root
                                unit, kept gathered through the chunked loss) and a layer plus the next prefetched
    activations micro_batch * max_model_len * H * (2 per layer with gradient checkpointing, else ~34 per layer),
                plus the LM head chunk's [C, V] logits, log-probs and their gradient in fp32
    teacher     b * P           the local teacher engine (the frozen base model); 0 with the teacher service
                                (engine.score_kind=server)
    vLLM        utilization * G while it samples (weights b * P / TP, KV cache, its buffers); asleep while the
                teacher and trainer run (weights offloaded to host memory, KV cache freed)
    overhead    CUDA context, NCCL and allocator slack, 2 GiB

The peak is the larger of the two phases: sampling (vLLM + trainer + teacher + overhead) and training
(trainer + gathered + activations + teacher + overhead). The estimate is deliberately simple and on the
safe side; what it leaves out (fragmentation, vLLM's CUDA graphs beyond its budget) is why 2 GiB stay free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.errors import UserError

GIB = 1 << 30
OVERHEAD = 2 * GIB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(UserError, ValueError):
    """A recipe that cannot fit the launch it is given; the message shows the arithmetic."""


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that decide its memory."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def of(cls, model_folder: Path) -> Shape:
        """Read from config.json (no weights are touched)."""
        path = Path(model_folder) / "config.json"
        if not path.exists():
            raise PlanError(f"{path} does not exist: the memory plan reads the model's config.json")
        config = json.loads(path.read_text())
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   layers=config["num_hidden_layers"], heads=heads, kv_heads=config.get("num_key_value_heads", heads),
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   tied=bool(config.get("tie_word_embeddings", False)),
                   qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)))

    @property
    def layer_parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        bias = self.head_dim * (self.heads + 2 * self.kv_heads) if self.qkv_bias else 0
        return attention + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def root_parameters(self) -> int:
        """Embeddings, the final norm and an untied LM head: FSDP2's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters


@dataclass(frozen=True)
class Launch:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


def plan(shape: Shape, config: RunConfig, launch: Launch) -> dict[str, int]:
    """Bytes per GPU of each part, and the peak of the sampling and training phases."""
    train, engine = config.train, config.engine
    weight_bytes = DTYPE_BYTES[config.model.dtype]
    compute_bytes = 2 if train.bf16 else DTYPE_BYTES[train.master_dtype]
    sharing = launch.ranks if train.parallel == "fsdp" and launch.ranks > 1 else 1
    per_parameter = 16 if train.master_dtype == "float32" else 8
    trainable = shape.parameters
    if train.lora:  # adapters only; the frozen base in master precision
        trainable = 2 * train.lora_rank * shape.layers * 7 * shape.hidden
        base = shape.parameters * DTYPE_BYTES[train.master_dtype]
    else:
        base = 0
    parts = {"trainer": trainable * per_parameter // sharing + base // sharing}
    parts["gathered"] = (shape.root_parameters + 2 * shape.layer_parameters) * compute_bytes if sharing > 1 else 0
    # Values kept per token and hidden unit: ~17 per layer for backward (Korthikanti et al., 2022); with gradient
    # checkpointing one per layer (its input) plus one layer's 17 while it is recomputed.
    values = shape.layers + 17 if train.gradient_checkpointing else 17 * shape.layers
    tokens = train.micro_batch_size * config.model.max_model_len
    parts["activations"] = tokens * shape.hidden * compute_bytes * values + 3 * 4 * train.chunk_positions * shape.vocab
    parts["teacher"] = 0 if engine.score_kind == "server" else shape.parameters * weight_bytes
    parts["vllm"] = int(engine.vllm_gpu_memory_utilization * launch.gpu_memory_gib * GIB) \
        if engine.kind != "hf" else shape.parameters * weight_bytes
    parts["overhead"] = OVERHEAD
    parts["sampling_peak"] = parts["vllm"] + parts["trainer"] + parts["teacher"] + parts["overhead"]
    parts["training_peak"] = (parts["trainer"] + parts["gathered"] + parts["activations"] + parts["teacher"]
                              + parts["overhead"] + (0 if engine.kind != "hf" else parts["vllm"]))
    parts["vllm_weights"] = shape.parameters * weight_bytes // engine.vllm_tensor_parallel_size
    parts["kv_bytes_per_token"] = 2 * shape.layers * shape.kv_heads * shape.head_dim * weight_bytes
    return parts


def describe(shape: Shape, config: RunConfig, launch: Launch, parts: dict[str, int]) -> str:
    """The plan as a table of GiB per GPU, with the arithmetic behind each line."""
    gib = lambda n: f"{n / GIB:7.1f} GiB"  # noqa: E731
    sharing = launch.ranks if config.train.parallel == "fsdp" and launch.ranks > 1 else 1
    kv_budget = parts["vllm"] - parts["vllm_weights"]
    lines = [
        f"memory plan per GPU: {shape.parameters / 1e9:.2f}B parameters on {launch.nodes} node(s) x "
        f"{launch.gpus_per_node} GPU(s) of {launch.gpu_memory_gib:g} GiB ({config.train.parallel}, "
        f"shared by {sharing})",
        f"  trainer      {gib(parts['trainer'])}   {config.train.master_dtype} weights + gradients + AdamW / {sharing}",
        f"  gathered     {gib(parts['gathered'])}   FSDP2 root unit + 2 layers in compute precision",
        f"  activations  {gib(parts['activations'])}   {config.train.micro_batch_size} x {config.model.max_model_len} "
        f"tokens, checkpointing {'on' if config.train.gradient_checkpointing else 'off'}, LM head chunk "
        f"{config.train.chunk_positions} x {shape.vocab}",
        f"  teacher      {gib(parts['teacher'])}   "
        + ("the teacher service (engine.score_kind=server)" if config.engine.score_kind == "server"
           else f"the frozen base model, a local engine in {config.model.dtype}"),
        f"  student      {gib(parts['vllm'])}   vLLM at {config.engine.vllm_gpu_memory_utilization:g} of the GPU: "
        f"weights {gib(parts['vllm_weights']).strip()}, KV cache {gib(kv_budget).strip()} "
        f"({max(kv_budget, 0) // parts['kv_bytes_per_token']:,} tokens)",
        f"  overhead     {gib(parts['overhead'])}   CUDA context, NCCL, allocator",
        f"  peak         {gib(max(parts['sampling_peak'], parts['training_peak']))}   sampling "
        f"{gib(parts['sampling_peak']).strip()}, training {gib(parts['training_peak']).strip()}",
    ]
    return "\n".join(lines)


def check(shape: Shape, config: RunConfig, launch: Launch) -> str:
    """The plan as text; PlanError with the same text when it does not fit the GPUs."""
    parts = plan(shape, config, launch)
    text = describe(shape, config, launch, parts)
    capacity = launch.gpu_memory_gib * GIB
    problems = []
    peak = max(parts["sampling_peak"], parts["training_peak"])
    if peak > capacity:
        problems.append(f"the peak {peak / GIB:.1f} GiB is over the GPU's {launch.gpu_memory_gib:g} GiB")
    min_kv = 4 * config.model.max_model_len * parts["kv_bytes_per_token"]
    if config.engine.kind != "hf" and parts["vllm"] - parts["vllm_weights"] < min_kv:
        problems.append(f"vLLM's share ({config.engine.vllm_gpu_memory_utilization:g}) leaves less KV cache than 4 "
                        f"sequences of {config.model.max_model_len} tokens ({min_kv / GIB:.1f} GiB)")
    if problems:
        raise PlanError(f"{text}\nthis recipe does not fit: {'; '.join(problems)}. Use more ranks with "
                        "train.parallel=fsdp, the teacher service (engine.score_kind=server), a smaller "
                        "engine.vllm_gpu_memory_utilization, "
                        "train.gradient_checkpointing, or a smaller train.micro_batch_size")
    return text


def check_this_launch(config: RunConfig, world) -> str:
    """The plan for the GPUs this job runs on (torchrun's LOCAL_WORLD_SIZE ranks per node), refused before any model
    loads when it does not fit."""
    import os

    import torch

    from rgsd_pipeline.models import resolve_model

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    launch = Launch(max(world.size // per_node, 1), per_node, memory)
    return check(Shape.of(resolve_model(config.model)), config, launch)
