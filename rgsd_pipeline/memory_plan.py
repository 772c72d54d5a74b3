"""What one GPU holds in each phase of a resident `iterate`, estimated from the model's config.json before anything
loads (docs/architecture.md, "Memory per GPU").

Per GPU, in bytes (P parameters, F ranks sharing the FSDP2 shards, b = bytes per weight in model.dtype, G the GPU):

    trainer     P * 16 / F      fp32 master weights (4) + gradients (4) + AdamW moments (8), sharded by FSDP2
                                (DDP: F = 1, every rank holds all of it); bf16 master weights: 8
    gathered    what FSDP2 gathers for compute: the root unit (embeddings, head, norms) in fp32, kept gathered through
                the chunked loss, and a layer plus the next prefetched in compute precision
    activations micro_batch * max_model_len * H * (2 per layer with gradient checkpointing, else ~34 per layer),
                plus the LM head chunk's [C, V] logits, log-probs and their gradient in fp32
    export      the checkpoint's weights gathered one tensor at a time: the largest tensor in fp32 and in b
    teacher     a vLLM teacher: its share utilization * G in every phase (it never sleeps: vLLM's sleep acts on
                every engine of a process); the transformers teacher: b * P, plus a scoring batch's activations;
                the teacher service (engine.score_kind=server): 0
    student     vLLM: utilization * G while it samples (weights b * P / TP, KV cache, its buffers), nothing while
                it sleeps (sleep mode, level 2); the transformers engine: b * P in every phase
    reference   b * P           the trainer's frozen base model for a loss with a KL term (grpo with
                                train.kl_coef), held in model.dtype for the whole run, in every phase; else 0
    overhead    CUDA context, NCCL and allocator slack, 2 GiB

Phases: sampling (student awake), scoring (the teacher at work), training (the optimizer steps, then the
export). The peak is the largest; what the estimate leaves out (fragmentation, vLLM's CUDA graphs beyond its budget)
is why 2 GiB stay free. Each phase's measured peak is printed beside its estimate once per iteration
(rgsd_pipeline/memory_watch.py).
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
PHASES = ("sampling", "scoring", "training")


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
    qk_norm: bool = False

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
                   qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
                   qk_norm=config.get("model_type") == "qwen3")

    @property
    def layer_parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        bias = self.head_dim * (self.heads + 2 * self.kv_heads) if self.qkv_bias else 0
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return attention + bias + 3 * self.hidden * self.intermediate + norms

    @property
    def root_parameters(self) -> int:
        """Embeddings, the final norm and an untied LM head: FSDP2's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest weight tensor (the embeddings, or an MLP projection)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


@dataclass(frozen=True)
class Launch:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    kv_cache_bytes: int | None = None  # a vLLM engine's KV cache beside its weights; None: its utilization share
    overhead: int = OVERHEAD  # what a rank holds before any model loads

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


def engine_kinds(config: RunConfig) -> tuple[str, str]:
    """(student, teacher) engine kinds on a GPU node, where `auto` is vLLM: vllm, hf or server."""
    student = "vllm" if config.engine.kind == "auto" else config.engine.kind
    teacher = config.engine.score_kind or config.engine.kind
    return student, "vllm" if teacher == "auto" else teacher


def plan(shape: Shape, config: RunConfig, launch: Launch) -> dict[str, int]:
    """Bytes per GPU of each part, and the peak of each phase (PHASES, as `<phase>_peak`)."""
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
    share = (int(engine.vllm_gpu_memory_utilization * launch.gpu_memory_gib * GIB) if launch.kv_cache_bytes is None
             else launch.kv_cache_bytes + shape.parameters * weight_bytes)
    student_kind, teacher_kind = engine_kinds(config)
    parts = {"trainer": trainable * per_parameter // sharing + base // sharing}
    parts["gathered"] = (shape.root_parameters * 4 + 2 * shape.layer_parameters * compute_bytes) if sharing > 1 else 0
    # Values kept per token and hidden unit: ~17 per layer for backward (Korthikanti et al., 2022); with gradient
    # checkpointing one per layer (its input) plus one layer's 17 while it is recomputed.
    values = shape.layers + 17 if train.gradient_checkpointing else 17 * shape.layers
    tokens = train.micro_batch_size * config.model.max_model_len
    parts["activations"] = tokens * shape.hidden * compute_bytes * values + 3 * 4 * train.chunk_positions * shape.vocab
    parts["export"] = shape.largest_tensor * ((4 if sharing > 1 else 0) + weight_bytes)
    scoring_batch = engine.hf_batch_size * config.model.max_model_len
    parts["teacher"] = {"server": 0, "vllm": share}.get(teacher_kind, shape.parameters * weight_bytes)
    parts["teacher_scoring"] = (scoring_batch * (shape.hidden + 2 * shape.intermediate) * weight_bytes
                                + 2 * 4 * 256 * shape.vocab) if teacher_kind == "hf" else 0
    parts["student_awake"] = share if student_kind == "vllm" else shape.parameters * weight_bytes
    parts["student_asleep"] = 0 if student_kind == "vllm" else parts["student_awake"]
    parts["reference"] = shape.parameters * weight_bytes if train.objective.needs_reference(train) else 0
    parts["overhead"] = launch.overhead
    always = parts["trainer"] + parts["teacher"] + parts["reference"] + parts["overhead"]
    parts["sampling_peak"] = always + parts["student_awake"]
    parts["scoring_peak"] = always + parts["student_asleep"] + parts["teacher_scoring"]
    parts["training_peak"] = always + parts["student_asleep"] + max(parts["gathered"] + parts["activations"],
                                                                     parts["export"])
    parts["vllm_weights"] = shape.parameters * weight_bytes // engine.vllm_tensor_parallel_size
    parts["kv_bytes_per_token"] = 2 * shape.layers * shape.kv_heads * shape.head_dim * weight_bytes
    return parts


def peak(parts: dict[str, int]) -> int:
    return max(parts[f"{phase}_peak"] for phase in PHASES)


def largest_part(parts: dict[str, int], phase: str) -> str:
    """The part that weighs most in a phase's estimate, for a message that names it."""
    members = {"sampling": ("trainer", "teacher", "reference", "student_awake"),
               "scoring": ("trainer", "teacher", "reference", "teacher_scoring", "student_asleep"),
               "training": ("trainer", "teacher", "reference", "student_asleep", "gathered", "activations",
                            "export")}[phase]
    return max(members, key=parts.__getitem__)


def describe(shape: Shape, config: RunConfig, launch: Launch, parts: dict[str, int]) -> str:
    """The plan as a table of GiB per GPU, with the arithmetic behind each line."""
    gib = lambda n: f"{n / GIB:7.1f} GiB"  # noqa: E731
    sharing = launch.ranks if config.train.parallel == "fsdp" and launch.ranks > 1 else 1
    student_kind, teacher_kind = engine_kinds(config)
    kv_budget = parts["student_awake"] - parts["vllm_weights"]
    utilization = config.engine.vllm_gpu_memory_utilization
    student = (f"vLLM at {utilization:g} of the GPU while it samples: weights {gib(parts['vllm_weights']).strip()}, "
               f"KV cache {gib(kv_budget).strip()} ({max(kv_budget, 0) // parts['kv_bytes_per_token']:,} tokens); "
               "asleep (level 2) otherwise" if student_kind == "vllm" else
               f"a transformers engine in {config.model.dtype}, in every phase")
    teacher = {"server": "the teacher service (engine.score_kind=server)",
               "vllm": f"a vLLM engine at {utilization:g} of the GPU, in every phase (it never sleeps)"}.get(
        teacher_kind, f"the frozen base model in {config.model.dtype}, a transformers engine")
    lines = [
        f"memory plan per GPU: {shape.parameters / 1e9:.2f}B parameters on {launch.nodes} node(s) x "
        f"{launch.gpus_per_node} GPU(s) of {launch.gpu_memory_gib:g} GiB ({config.train.parallel}, "
        f"shared by {sharing})",
        f"  trainer      {gib(parts['trainer'])}   {config.train.master_dtype} weights + gradients + AdamW / {sharing}",
        f"  gathered     {gib(parts['gathered'])}   FSDP2 root unit in fp32 + 2 layers in compute precision",
        f"  activations  {gib(parts['activations'])}   {config.train.micro_batch_size} x {config.model.max_model_len} "
        f"tokens, checkpointing {'on' if config.train.gradient_checkpointing else 'off'}, LM head chunk "
        f"{config.train.chunk_positions} x {shape.vocab}",
        f"  export       {gib(parts['export'])}   the checkpoint gathered one tensor at a time",
        f"  teacher      {gib(parts['teacher'])}   {teacher}"
        + (f" (+{gib(parts['teacher_scoring']).strip()} while it scores)" if parts["teacher_scoring"] else ""),
        *([f"  reference    {gib(parts['reference'])}   the frozen base model for train.kl_coef, in "
           f"{config.model.dtype}"] if parts["reference"] else []),
        f"  student      {gib(parts['student_awake'])}   {student}",
        f"  overhead     {gib(parts['overhead'])}   CUDA context, NCCL, allocator",
        "  peak per phase: " + ", ".join(f"{phase} {gib(parts[f'{phase}_peak']).strip()}" for phase in PHASES),
        f"  peak         {gib(peak(parts))}",
    ]
    return "\n".join(lines)


def check(shape: Shape, config: RunConfig, launch: Launch) -> str:
    """The plan as text; PlanError with the same text when it does not fit the GPUs."""
    parts = plan(shape, config, launch)
    text = describe(shape, config, launch, parts)
    capacity = launch.gpu_memory_gib * GIB
    problems = []
    if peak(parts) > capacity:
        phase = max(PHASES, key=lambda p: parts[f"{p}_peak"])
        problems.append(f"the {phase} peak {peak(parts) / GIB:.1f} GiB is over the GPU's {launch.gpu_memory_gib:g} GiB "
                        f"(its largest part: {largest_part(parts, phase)})")
    min_kv = 4 * config.model.max_model_len * parts["kv_bytes_per_token"]
    if engine_kinds(config)[0] == "vllm" and parts["student_awake"] - parts["vllm_weights"] < min_kv:
        problems.append(f"vLLM's share ({config.engine.vllm_gpu_memory_utilization:g}) leaves less KV cache than 4 "
                        f"sequences of {config.model.max_model_len} tokens ({min_kv / GIB:.1f} GiB)")
    if problems:
        raise PlanError(f"{text}\nthis recipe does not fit: {'; '.join(problems)}. Use more ranks with "
                        "train.parallel=fsdp, the teacher service (engine.score_kind=server), a smaller "
                        "engine.vllm_gpu_memory_utilization, "
                        "train.gradient_checkpointing, or a smaller train.micro_batch_size")
    return text


def this_launch(world) -> Launch:
    """The launch this job runs on: torchrun's LOCAL_WORLD_SIZE ranks per node, this GPU's memory."""
    import os

    import torch

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return Launch(max(world.size // per_node, 1), per_node, memory)


def check_this_launch(config: RunConfig, world) -> str:
    """The plan for the GPUs this job runs on, refused before any model loads when it does not fit."""
    from rgsd_pipeline.models import resolve_model

    return check(Shape.of(resolve_model(config.model, weights=False)), config, this_launch(world))
