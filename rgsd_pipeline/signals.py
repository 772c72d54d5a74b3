"""Teacher signals: teacher inputs, storage types, loss masks, and Arrow columns built from engine scores."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rgsd_pipeline.config import ConfigError, ScoreConfig, TemplateConfig
from rgsd_pipeline.engines.base import Scores
from rgsd_pipeline.render import chat_ids, teacher_messages
from schemas import ENCODING_KEY, LOGPROB_CODE_SCALE, ArtifactSchema, signals_schema


def storage_schema(score_config: ScoreConfig, vocab_size: int) -> ArtifactSchema:
    """The signals schema for this run: uint16 ids when the vocabulary fits in 16 bits (halves the id bytes)."""
    id_dtype = score_config.id_dtype
    if id_dtype == "auto":
        id_dtype = "uint16" if vocab_size <= 1 << 16 else "int32"
    if id_dtype == "uint16" and vocab_size > 1 << 16:
        raise ConfigError(f"score.id_dtype=uint16 cannot hold a vocabulary of {vocab_size}; use auto or int32")
    guidance = ({"scale": score_config.guidance, "negative": score_config.guidance_negative}
                if score_config.guidance > 0 else None)
    return signals_schema(score_config.top_k, value_type=getattr(pa, score_config.value_dtype)(),
                          id_type=getattr(pa, id_dtype)(), guidance=guidance)


def encode_logprobs(logprobs: np.ndarray, value_type: pa.DataType) -> np.ndarray:
    """Log-probs as stored: uint8 sqrt-spaced codes, or the float type itself."""
    if value_type == pa.uint8():
        return np.clip(np.rint(np.sqrt(np.clip(-logprobs, 0.0, 16.0)) * LOGPROB_CODE_SCALE), 0, 255).astype(np.uint8)
    return logprobs.astype(value_type.to_pandas_dtype())


def decode_logprobs(stored: np.ndarray) -> np.ndarray:
    """float32 log-probs from stored values (uint8 codes or floats), before the rescaling to the stored tail."""
    if stored.dtype == np.uint8:
        return -np.square(stored.astype(np.float32) / LOGPROB_CODE_SCALE)
    return stored.astype(np.float32)


def read_encoding(path) -> dict:
    """The `rgsd.encoding` key-value metadata of a signals shard: how to decode its columns."""
    import pyarrow.parquet as pq

    return json.loads((pq.read_schema(path).metadata or {})[ENCODING_KEY])


@dataclass
class TeacherInputs:
    """The teacher's view of one rollouts shard: a key per row, and the sequences to score for the rows that fit."""

    keys: list[dict] = field(default_factory=list)  # prompt_id, sample_idx, teacher_prompt_len, status per row
    sequences: list[list[int]] = field(default_factory=list)  # teacher prompt ids + the student's response ids
    prompt_lens: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # which row of the shard each sequence belongs to
    negatives: list[list[int]] = field(default_factory=list)  # score.guidance: the negative pass's prompt + response
    negative_lens: list[int] = field(default_factory=list)


def teacher_inputs(rollout_rows: list[dict], prompts: dict[str, dict], tokenizer, template: TemplateConfig,
                   max_model_len: int, score_config: ScoreConfig | None = None,
                   others: dict[str, dict] | None = None) -> TeacherInputs:
    """Teacher input = the teacher prompt (rubric template, chat template, generation prompt) followed by the
    student's response ids exactly as sampled, never re-tokenized. With score.guidance, the negative pass's input
    too (rgsd_pipeline/guidance.py): the rollout's own prompt ids (plain) or the question with another training
    prompt's rubric (other_rubric, `others` from guidance.other_rubrics), followed by the same response ids.
    Skipped rollouts, and sequences over the context, get a `skipped:` status and no sequence."""
    from rgsd_pipeline.guidance import negative_messages

    guided = score_config is not None and score_config.guidance > 0
    out = TeacherInputs()
    for index, row in enumerate(rollout_rows):
        teacher_ids = chat_ids(tokenizer, teacher_messages(prompts[row["prompt_id"]], template))
        key = {"prompt_id": row["prompt_id"], "sample_idx": row["sample_idx"], "teacher_prompt_len": len(teacher_ids),
               "status": "ok"}
        negative_ids = []
        if guided:
            negative_ids = list(row["prompt_token_ids"]) if score_config.guidance_negative == "plain" else chat_ids(
                tokenizer, negative_messages(prompts[row["prompt_id"]], template, score_config.guidance_negative,
                                             others))
        length = max(len(teacher_ids), len(negative_ids)) + len(row["response_token_ids"])
        if row["finish_reason"].startswith("skipped:"):
            key["status"] = "skipped:rollout was skipped"
        elif length > max_model_len:
            key["status"] = (f"skipped:teacher prompt + response is {length} tokens, over model.max_model_len = "
                             f"{max_model_len}")
        else:
            out.sequences.append(teacher_ids + row["response_token_ids"])
            out.prompt_lens.append(len(teacher_ids))
            out.rows.append(index)
            if guided:
                out.negatives.append(negative_ids + row["response_token_ids"])
                out.negative_lens.append(len(negative_ids))
        out.keys.append(key)
    return out


def token_span_ids(tokenizer, text: str) -> list[int]:
    """The ids a tag is written with: a single special token where the vocabulary has one."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id is not None:
        return [token_id]
    return tokenizer.encode(text, add_special_tokens=False)


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


def _find_last(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle), -1, -1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


def loss_mask(response_ids: list[int], eos_ids: set[int], think: tuple[list[int], list[int]] | None,
              eos_in_loss: bool, prompt_ids: list[int] = ()) -> list[bool]:
    """Which response tokens are distilled.

    With `think = (open_ids, close_ids)`, tokens from an opening tag through its closing tag are masked. The
    prompt decides where the response starts: when its last opening tag comes after its last closing tag
    (a chat template that opens the reasoning span itself), the response starts inside a span and is masked
    up to its first closing tag. A span never closed (a response cut at max_new_tokens) is masked to the end.
    """
    mask = [True] * len(response_ids)
    if think is not None:
        open_ids, close_ids = think
        prompt_ids = list(prompt_ids)
        position = 0
        if _find_last(prompt_ids, open_ids) > _find_last(prompt_ids, close_ids):
            end = _find(response_ids, close_ids, 0)
            position = len(response_ids) if end == -1 else end + len(close_ids)
            mask[:position] = [False] * position
        while (start := _find(response_ids, open_ids, position)) != -1:
            end = _find(response_ids, close_ids, start + len(open_ids))
            stop = len(response_ids) if end == -1 else end + len(close_ids)
            mask[start:stop] = [False] * (stop - start)
            position = stop
    if not eos_in_loss and response_ids and response_ids[-1] in eos_ids:
        mask[-1] = False
    return mask


def nested_list(values_N_K: np.ndarray, lengths: list[int], value_type: pa.DataType) -> pa.Array:
    """list<fixed_size_list<value_type, K>> from the row-concatenated [N, K] array and per-row lengths."""
    k = values_N_K.shape[1]
    flat = pa.array(values_N_K.reshape(-1), type=value_type)
    inner = pa.FixedSizeListArray.from_arrays(flat, k)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, inner)


def signals_table(keys: list[dict], scores: list[Scores | None], masks: list[list[bool]], schema: ArtifactSchema,
                  k: int) -> pa.Table:
    """Signals rows: `keys` holds prompt_id, sample_idx, teacher_prompt_len and status per row; a None score is a
    skip."""
    fields = {f.name: f.type for f in schema.arrow}
    id_type, value_type = fields["topk_ids"].value_type.value_type, fields["topk_logprobs"].value_type.value_type
    lengths = [0 if s is None else len(s.token_logprob_T) for s in scores]
    present = [s for s in scores if s is not None and len(s.token_logprob_T)]

    def stack(name, dtype, width):
        arrays = [getattr(s, name) for s in present]
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, width) if width else 0, dtype)

    def per_position(values: np.ndarray, type_: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values, type_))

    ids = stack("topk_ids_T_K", id_type.to_pandas_dtype(), k)
    values = encode_logprobs(stack("topk_logprobs_T_K", np.float32, k), value_type)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = {
        "prompt_id": pa.array([r["prompt_id"] for r in keys], pa.string()),
        "sample_idx": pa.array([r["sample_idx"] for r in keys], pa.int32()),
        "teacher_prompt_len": pa.array([r["teacher_prompt_len"] for r in keys], pa.int32()),
        "status": pa.array([r["status"] for r in keys], pa.string()),
        "topk_ids": nested_list(ids.reshape(-1, k), lengths, id_type),
        "topk_logprobs": nested_list(values.reshape(-1, k), lengths, value_type),
        "tail_logprob": per_position(stack("tail_logprob_T", np.float32, None), pa.float32()),
        "token_logprob": per_position(stack("token_logprob_T", np.float32, None), pa.float32()),
        "loss_mask": per_position(np.array([b for m in masks for b in m], dtype=bool), pa.bool_()),
        "rubric_token_logprob": _passes(scores, "rubric_token_logprob_T"),
        "negative_token_logprob": _passes(scores, "negative_token_logprob_T"),
    }
    return pa.table(columns)


def _passes(scores: list[Scores | None], name: str) -> pa.Array:
    """One pass's log-probs of the sampled tokens per row (guided scores), null for rows without them."""
    return pa.array([None if s is None or getattr(s, name) is None else getattr(s, name).astype(np.float32)
                     for s in scores], pa.list_(pa.float32()))


def topk_bytes(files) -> int:
    """Compressed bytes of the top-k id and log-prob columns across Parquet files (from their footers)."""
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        metadata = pq.read_metadata(file)
        for group in range(metadata.num_row_groups):
            for index in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(index)
                if chunk.path_in_schema.startswith(("topk_ids", "topk_logprobs")):
                    total += chunk.total_compressed_size
    return total
