"""Versioned Arrow schemas of every artifact rgsd-pipeline writes.

This module is the single source of truth for column names and types: shard writers validate
against it, readers check the name and version recorded in each shard and manifest, and the README's
column reference is generated from it.

A schema's version is bumped whenever a column is added, removed or changes type. Readers refuse a
shard whose version differs from the one this code knows, naming the shard and both versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_NAME_KEY = b"rgsd.schema"
SCHEMA_VERSION_KEY = b"rgsd.schema_version"


@dataclass(frozen=True)
class ArtifactSchema:
    """An Arrow schema plus the name and version stamped into every shard written with it."""

    name: str
    version: int
    arrow: pa.Schema
    doc: str
    parquet_options: tuple = ()  # extra pyarrow.parquet.write_table keyword arguments, as (key, value) pairs

    def stamped(self) -> pa.Schema:
        """The Arrow schema with the name and version in its metadata, as written to Parquet."""
        return self.arrow.with_metadata(
            {SCHEMA_NAME_KEY: self.name.encode(), SCHEMA_VERSION_KEY: str(self.version).encode()}
        )


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
    version=1,
    doc="One row per canonical prompt: the student sees `messages`, the teacher also sees `rubric`.",
    arrow=pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),  # stable content hash, see ingest.prompt_id
            pa.field("messages", pa.list_(MESSAGE), nullable=False),  # chat turns; the last is the user's
            pa.field("rubric", pa.list_(CRITERION), nullable=False),  # negative points mark pitfalls
            pa.field("source", pa.string(), nullable=False),  # "<file>:<row>" it was read from
            pa.field("domain", pa.string(), nullable=True),  # e.g. "medical", "science"
            pa.field("reference_answer", pa.string(), nullable=True),
            pa.field("split", pa.string(), nullable=False),  # "train" or "heldout"
            pa.field("prompt_tokens", pa.int32(), nullable=False),  # student prompt length after chat template
        ]
    ),
)

QUARANTINE = ArtifactSchema(
    name="quarantine",
    version=1,
    doc="Rows rejected by `prepare`, with where they came from and why.",
    arrow=pa.schema(
        [
            pa.field("file", pa.string(), nullable=False),
            pa.field("row", pa.int64(), nullable=False),  # 1-based line (JSONL) or row (Parquet, datasets)
            pa.field("field", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("raw", pa.string(), nullable=True),  # the row as text, cut to 2,000 characters
        ]
    ),
)

ROLLOUTS = ArtifactSchema(
    name="rollouts",
    version=1,
    doc="One row per (prompt_id, sample_idx): the student's on-policy sample and its behaviour log-probs.",
    arrow=pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_idx", pa.int32(), nullable=False),
            pa.field("iteration", pa.int32(), nullable=False),
            pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),  # behaviour policy
            pa.field("response_text", pa.string(), nullable=False),
            pa.field("finish_reason", pa.string(), nullable=False),  # "stop", "length" or "skipped:<why>"
        ]
    ),
)


LOGPROB_CODE_SCALE = 255 / 4.0
"""uint8 log-prob codes: code = round(sqrt(-logprob) * LOGPROB_CODE_SCALE), logprob = -(code / LOGPROB_CODE_SCALE)**2.
Steps are fine where probability mass is (0.0002 nats near 0, 0.03 at -1) and coarse far in the tail
(0.12 at -16, the floor); about 1e-4 nats of JSD against fp16 on SmolLM2 signals."""


def signals_schema(k: int, value_type: pa.DataType = pa.uint8(), id_type: pa.DataType = pa.uint16()) -> ArtifactSchema:
    """The teacher-signals schema for top-`k` entries stored with the given id and value types.

    Per response position t: `topk_ids[t]` / `topk_logprobs[t]` are the teacher's k most likely next
    tokens, best first; `token_logprob[t]` is the teacher's log-prob of the token the student sampled
    (which may lie outside the top-k); `loss_mask[t]` is false for tokens left out of the loss.
    With uint8 values, `topk_logprobs` holds codes (see LOGPROB_CODE_SCALE); float types hold log-probs.
    Ids are written without dictionary encoding and with byte-stream-split, which compresses them best.
    """
    return ArtifactSchema(
        name="signals",
        version=1,
        doc="Row-aligned 1:1 with rollouts: the teacher's top-k log-probs at every response position.",
        arrow=pa.schema(
            [
                pa.field("prompt_id", pa.string(), nullable=False),
                pa.field("sample_idx", pa.int32(), nullable=False),
                pa.field("teacher_prompt_len", pa.int32(), nullable=False),
                pa.field("status", pa.string(), nullable=False),  # "ok" or "skipped:<why>" (then lists are empty)
                pa.field("topk_ids", pa.list_(pa.list_(id_type, k)), nullable=False),
                pa.field("topk_logprobs", pa.list_(pa.list_(value_type, k)), nullable=False),
                pa.field("token_logprob", pa.list_(pa.float32()), nullable=False),
                pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
            ]
        ),
        parquet_options=(
            ("use_dictionary", ["prompt_id", "status", "topk_logprobs.list.element.list.element"]),
            ("use_byte_stream_split", ["topk_ids.list.element.list.element"]),
        ),
    )


EVAL_VERDICTS = ArtifactSchema(
    name="eval_verdicts",
    version=1,
    doc="One row per (prompt, sample, criterion): the judge's verdict at evaluation time.",
    arrow=pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_idx", pa.int32(), nullable=False),
            pa.field("iteration", pa.int32(), nullable=False),
            pa.field("criterion_idx", pa.int32(), nullable=False),
            pa.field("criterion", pa.string(), nullable=False),
            pa.field("points", pa.float32(), nullable=False),
            pa.field("met", pa.bool_(), nullable=True),  # null when the verdict could not be parsed
            pa.field("explanation", pa.string(), nullable=True),
            pa.field("judge_model", pa.string(), nullable=False),
        ]
    ),
)

MANIFEST_VERSION = 1
MANIFEST_SHARD = pa.struct(
    [
        pa.field("index", pa.int32(), nullable=False),
        pa.field("file", pa.string(), nullable=False),  # relative to the stage folder, no "/" or ".."
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)
"""The shape of each entry in `manifest.json`'s `shards` list (manifest.json itself is JSON:
`{"manifest_version", "schema": {"name", "version"}, "shards": [...], "rows", "inputs": {name: fingerprint}}`)."""

ALL = {s.name: s for s in (PROMPTS, QUARANTINE, ROLLOUTS, EVAL_VERDICTS)}
