"""Versioned Arrow schemas of every artifact rgsd-pipeline writes.

This module is the single source of truth for column names, types and meanings: shard writers
validate against it, readers check the name and version recorded in each shard and manifest, and the
column reference in docs/architecture.md is generated from it (`column_reference()`, checked by a
test). Every column carries its description as Arrow field metadata, so it travels inside the files.

A schema's version is bumped whenever a column is added, removed or changes type or meaning. Readers
refuse a shard whose version differs from the one this code knows, naming the shard and both versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_NAME_KEY = b"rgsd.schema"
SCHEMA_VERSION_KEY = b"rgsd.schema_version"
ENCODING_KEY = b"rgsd.encoding"
DESCRIPTION_KEY = b"description"


@dataclass(frozen=True)
class ArtifactSchema:
    """An Arrow schema plus the name, version and any other key-values stamped into every shard written with it."""

    name: str
    version: int
    arrow: pa.Schema
    doc: str  # what one row is
    parquet_options: tuple = ()  # extra pyarrow.parquet.write_table keyword arguments, as (key, value) pairs
    metadata: tuple = ()  # extra (key, value) pairs of Parquet key-value metadata

    def stamped(self) -> pa.Schema:
        """The Arrow schema with the name, version and extra metadata, as written to Parquet."""
        return self.arrow.with_metadata(
            {SCHEMA_NAME_KEY: self.name.encode(), SCHEMA_VERSION_KEY: str(self.version).encode(), **dict(self.metadata)}
        )


def column(name: str, type_: pa.DataType, description: str, nullable: bool = False) -> pa.Field:
    """A field carrying its description as metadata."""
    return pa.field(name, type_, nullable=nullable, metadata={DESCRIPTION_KEY: description.encode()})


MESSAGE = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])
CRITERION = pa.struct(
    [
        pa.field("criterion", pa.string(), nullable=False),
        pa.field("points", pa.float32(), nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
    ]
)

PROMPTS = ArtifactSchema(
    name="prompts",
    version=2,
    doc="One row per canonical prompt: the student sees `messages`, the teacher also sees `rubric`.",
    arrow=pa.schema(
        [
            column("prompt_id", pa.string(), "Stable content hash of messages and rubric (16 hex digits)"),
            column("messages", pa.list_(MESSAGE), "Chat turns; the last is the user's"),
            column("rubric", pa.list_(CRITERION), "Criteria with points; negative points mark pitfalls"),
            column("source", pa.string(), "`<file>:<row>` the row was read from"),
            column("source_id", pa.string(), "The data set's own id (RubricHub extra_info.id, HealthBench "
                                             "prompt_id, RaR id), when it has one", nullable=True),
            column("domain", pa.string(), "e.g. medical, science", nullable=True),
            column("reference_answer", pa.string(), "An expert answer, for the reference-answer teacher",
                   nullable=True),
            column("split", pa.string(), "train or heldout"),
            column("prompt_tokens", pa.int32(), "Student prompt length after the chat template"),
        ]
    ),
)

QUARANTINE = ArtifactSchema(
    name="quarantine",
    version=1,
    doc="One row per input row that `prepare` rejected, with where it came from and why.",
    arrow=pa.schema(
        [
            column("file", pa.string(), "The data file"),
            column("row", pa.int64(), "1-based line (JSONL) or row (JSON array, Parquet, datasets); 0 = the file"),
            column("field", pa.string(), "Where in the row the problem is, e.g. Rubrics[2].points"),
            column("reason", pa.string(), "What is wrong"),
            column("raw", pa.string(), "The row as text, cut to 2,000 characters", nullable=True),
        ]
    ),
)

ROLLOUTS = ArtifactSchema(
    name="rollouts",
    version=3,
    doc="One row per (prompt_id, sample_idx): the student's on-policy sample and its log-probs.",
    arrow=pa.schema(
        [
            column("prompt_id", pa.string(), "The prompt sampled"),
            column("sample_idx", pa.int32(), "Which of the prompt's samples"),
            column("iteration", pa.int32(), "Iteration that sampled it (-1: an evaluation answer)"),
            column("prompt_token_ids", pa.list_(pa.int32()), "Student prompt after the chat template"),
            column("response_token_ids", pa.list_(pa.int32()), "The sampled response, end-of-sequence included"),
            column("response_logprobs", pa.list_(pa.float32()),
                   "Log-prob of each sampled token under the policy's own distribution (temperature 1)"),
            column("sampling_logprobs", pa.list_(pa.float32()),
                   "Log-prob of each sampled token under the distribution it was drawn from (temperature, top-k, "
                   "top-p, repetition penalty applied): the behaviour policy. Null when sampling changed the "
                   "distribution and nothing asked for it (rollout.sampling_logprobs)", nullable=True),
            column("response_text", pa.string(), "The response decoded, special tokens removed"),
            column("finish_reason", pa.string(), "stop, length, or skipped:<why>"),
        ]
    ),
)


LOGPROB_CODE_SCALE = 255 / 4.0
"""uint8 log-prob codes: code = round(sqrt(-logprob) * LOGPROB_CODE_SCALE), logprob = -(code / LOGPROB_CODE_SCALE)**2.
Steps are fine where probability mass is (0.0002 nats near 0, 0.03 at -1) and coarse far in the tail
(0.12 at -16, the floor); about 1e-4 nats of JSD against fp16 on SmolLM2 signals. Decoded values are then
rescaled so that top-k + the stored tail mass = 1 (losses.teacher_buckets)."""


def signal_encoding(k: int, value_type: pa.DataType, id_type: pa.DataType) -> dict:
    """How a signals shard's columns are encoded: written into its Parquet key-value metadata (`rgsd.encoding`),
    so Polars, DuckDB or pyarrow alone can decode a shard."""
    codes = value_type == pa.uint8()
    return {
        "k": k,
        "topk_ids": {"type": str(id_type), "meaning": "the teacher's k most likely next-token ids, best first"},
        "topk_logprobs": {
            "type": str(value_type),
            "encoding": "uint8 sqrt code" if codes else "log-prob",
            "decode": f"logprob = -(code / {LOGPROB_CODE_SCALE}) ** 2" if codes else "logprob = value",
            "scale": LOGPROB_CODE_SCALE if codes else None,
            "then": "rescale so that sum(exp(topk)) = 1 - exp(tail_logprob): "
                    "topk + log1p(-exp(tail_logprob)) - logsumexp(topk)",
        },
        "tail_logprob": "log of the teacher's probability mass outside its top-k, fp32, measured at score time",
        "token_logprob": "the teacher's log-prob of the token the student sampled",
        "loss_mask": "false for tokens left out of the loss (reasoning spans, a final EOS when eos_in_loss=false)",
    }


def signals_schema(k: int, value_type: pa.DataType = pa.uint8(), id_type: pa.DataType = pa.uint16(),
                   guidance: dict | None = None) -> ArtifactSchema:
    """The teacher-signals schema for top-`k` entries stored with the given id and value types; `guidance` (scale
    and negative of score.guidance) is recorded in the encoding metadata.

    Ids are written without dictionary encoding and with byte-stream-split, which compresses them best.
    """
    lists = "; empty when status is not ok"
    return ArtifactSchema(
        name="signals",
        version=3,
        doc="Row-aligned 1:1 with rollouts: the teacher's top-k log-probs at every response position.",
        arrow=pa.schema(
            [
                column("prompt_id", pa.string(), "Key, as in rollouts"),
                column("sample_idx", pa.int32(), "Key, as in rollouts"),
                column("teacher_prompt_len", pa.int32(), "Tokens of the teacher prompt (rubric included)"),
                column("status", pa.string(), "ok, or skipped:<why>"),
                column("topk_ids", pa.list_(pa.list_(id_type, k)),
                       "Per response position, the teacher's top-k token ids, best first" + lists),
                column("topk_logprobs", pa.list_(pa.list_(value_type, k)),
                       "Per position, their log-probs (uint8 codes by default: see the rgsd.encoding metadata)"
                       + lists),
                column("tail_logprob", pa.list_(pa.float32()),
                       "Per position, log of the teacher's mass outside its top-k (fp32, exact)" + lists),
                column("token_logprob", pa.list_(pa.float32()),
                       "Per position, the teacher's log-prob of the token the student sampled" + lists),
                column("loss_mask", pa.list_(pa.bool_()), "Per position, whether the token is distilled" + lists),
                column("rubric_token_logprob", pa.list_(pa.float32()),
                       "score.guidance > 0: per position, the rubric pass alone's log-prob of the sampled token (the "
                       "unguided teacher); null without guidance", nullable=True),
                column("negative_token_logprob", pa.list_(pa.float32()),
                       "score.guidance > 0: per position, the negative pass's log-prob of the sampled token "
                       "(score.guidance_negative); null without guidance", nullable=True),
            ]
        ),
        parquet_options=(
            ("use_dictionary", ["prompt_id", "status", "topk_logprobs.list.element.list.element"]),
            ("use_byte_stream_split", ["topk_ids.list.element.list.element"]),
        ),
        metadata=((ENCODING_KEY, json.dumps({**signal_encoding(k, value_type, id_type),
                                             "guidance": guidance or {"scale": 0.0}}).encode()),),
    )


EVAL_VERDICTS = ArtifactSchema(
    name="eval_verdicts",
    version=1,
    doc="One row per (prompt, sample, criterion): the judge's verdict at evaluation time.",
    arrow=pa.schema(
        [
            column("prompt_id", pa.string(), "Key, as in the answers"),
            column("sample_idx", pa.int32(), "Key, as in the answers"),
            column("iteration", pa.int32(), "The answers' iteration field"),
            column("criterion_idx", pa.int32(), "Position of the criterion in the rubric"),
            column("criterion", pa.string(), "The criterion text"),
            column("points", pa.float32(), "Its points; negative for a pitfall"),
            column("met", pa.bool_(), "The verdict; null when it could not be obtained or parsed", nullable=True),
            column("explanation", pa.string(), "The judge's reason", nullable=True),
            column("judge_model", pa.string(), "The judge (a model name, or `rules`)"),
        ]
    ),
)

VERDICT = pa.struct([pa.field("met", pa.bool_(), nullable=True), pa.field("points", pa.float32(), nullable=False)])

REWARDS = ArtifactSchema(
    name="rewards",
    version=1,
    doc="Row-aligned 1:1 with rollouts: a judge's verdicts on each rollout and its reward (train.loss=grpo).",
    arrow=pa.schema(
        [
            column("prompt_id", pa.string(), "Key, as in rollouts"),
            column("sample_idx", pa.int32(), "Key, as in rollouts"),
            column("reward", pa.float32(), "Points of the met criteria (met pitfalls subtract) over the positive "
                                           "points of the graded ones; null when none could be graded or the rollout "
                                           "was skipped", nullable=True),
            column("verdicts", pa.list_(VERDICT), "Per criterion in rubric order: met (null: no verdict) and points"),
            column("judge", pa.string(), "Who graded: `rules`, or the judge model and mode"),
        ]
    ),
)

# metrics.jsonl: one JSON object per optimizer step (not Parquet: appended as training goes). Every line has the
# common fields; a distillation loss adds its own, the policy-gradient baseline (train.loss=grpo) its own.
METRICS_DOC = "One JSON object per optimizer step of an iteration, appended as training goes."
METRICS_COMMON = {
    "step": "Optimizer step within the iteration (1-based)",
    "global_step": "Optimizer steps of the run so far, this one included (the schedule's step)",
    "loss": "The loss of the global batch (clipped, weighted, summed over processes)",
    "grad_norm": "Gradient norm before clipping (train.max_grad_norm)",
    "lr": "Learning rate of the step",
    "sequences": "Sequences in the global batch",
    "loss_tokens": "Positions in the loss",
    "tokens_per_s": "Tokens through the model per second of the step (prompt and response)",
}
METRICS_DISTILL = {
    "divergence": "JSD(beta) between teacher and student per loss token, before clipping (the quantity RGSD lowers)",
    "clip_fraction": "Share of loss tokens where tau bit (train.clip)",
    "teacher_tail_mass": "Teacher's mass outside its top-k, per loss token",
    "student_tail_mass": "Student's mass outside the teacher's top-k, per loss token",
    "importance_weight": "Mean truncated importance weight (sampled_reverse_kl; 1 otherwise)",
}
METRICS_POLICY_GRADIENT = {
    "kl_to_base": "k3 estimate of KL(policy || base) per token (0 without train.kl_coef)",
    "ratio_clip_fraction": "Share of tokens whose ratio pi_theta / pi_old was clipped (train.grpo_clip)",
    "ratio_mean": "Mean ratio pi_theta / pi_old (1 on the first step of an iteration: pi_old is the trainer's own "
                  "log-prob at the iteration's starting weights)",
    "behaviour_weight": "Mean truncated importance weight min(train.importance_cap, pi_old / pi_behaviour) against "
                        "the distribution the engine drew from (1 when train.importance_cap is 0)",
}
METRICS_HYBRID = {
    "distill_loss": "The distillation term of the global batch's loss (jsd)",
    "policy_loss": "The GRPO term of the global batch's loss, before train.reward_weight",
}
METRICS_ROLLOUT_CHECK = {
    "rollout_logprob_gap_mean": "Mean absolute difference between the trainer's and the rollout engine's log-probs of "
                                "the sampled tokens, first micro-batch of each rank, before any update "
                                "(train.max_rollout_logprob_gap)",
    "rollout_logprob_gap_max": "The largest such difference",
}

MANIFEST_VERSION = 1
"""manifest.json: `{"manifest_version", "schema": {"name", "version"}, "shards": [{"index", "file", "rows",
"sha256"}...], "rows", "inputs": {name: fingerprint}}`; a shard's `file` is a plain part-NNNNN.parquet name."""

ARTIFACTS = (PROMPTS, QUARANTINE, ROLLOUTS, signals_schema(20), REWARDS, EVAL_VERDICTS)


def type_name(type_: pa.DataType) -> str:
    """A short spelling of an Arrow type: list<struct<role, content>>, list<list<uint16, 20>>."""
    if pa.types.is_fixed_size_list(type_):
        return f"list<{type_name(type_.value_type)}, {type_.list_size}>"
    if pa.types.is_list(type_):
        return f"list<{type_name(type_.value_type)}>"
    if pa.types.is_struct(type_):
        return "struct<" + ", ".join(type_.field(i).name for i in range(type_.num_fields)) + ">"
    return str(type_)


def column_reference() -> str:
    """A Markdown table per artifact, with every column's type and description (docs/architecture.md)."""
    parts = []
    for schema in ARTIFACTS:
        header = "| column | type | meaning |\n| --- | --- | --- |"
        parts.append(f"**{schema.name}** (v{schema.version}): {schema.doc}\n\n{header}")
        for field in schema.arrow:
            description = (field.metadata or {}).get(DESCRIPTION_KEY, b"").decode()
            nullable = " (nullable)" if field.nullable else ""
            parts[-1] += f"\n| `{field.name}` | `{type_name(field.type)}`{nullable} | {description} |"
    parts.append(f"**metrics.jsonl**: {METRICS_DOC}\n\n| field | on | meaning |\n| --- | --- | --- |")
    for fields, on in ((METRICS_COMMON, "every line"), (METRICS_DISTILL, "distillation losses (jsd+grpo too)"),
                       (METRICS_POLICY_GRADIENT, "train.loss=grpo, jsd+grpo"), (METRICS_HYBRID, "train.loss=jsd+grpo"),
                       (METRICS_ROLLOUT_CHECK, "an iteration's first step")):
        parts[-1] += "".join(f"\n| `{name}` | {on} | {meaning} |" for name, meaning in fields.items())
    return "\n\n".join(parts) + "\n"
