"""From data sources to canonical prompt rows: normalise, check, de-duplicate, budget, split.

Every row read ends up in exactly one place: the prompts, or the quarantine with its file, row,
field and reason. Valid rows of a file that also holds broken rows are kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rgsd_pipeline.config import DataConfig, TemplateConfig
from rgsd_pipeline.render import chat_ids, student_messages, teacher_messages
from rgsd_pipeline.rows import RowError, heldout, normalize, prompt_id, question_id, split_draw
from rgsd_pipeline.sources import RawRow, raw_text, read_source


@dataclass
class IngestResult:
    prompts: list[dict] = field(default_factory=list)  # rows of the prompts schema, in source order
    quarantine: list[dict] = field(default_factory=list)  # rows of the quarantine schema
    read_per_file: Counter = field(default_factory=Counter)
    left_out: int = 0  # valid training prompts beyond data.max_prompts

    def reject(self, raw: RawRow, field_name: str, reason: str) -> None:
        text = raw.raw if raw.value is None else raw_text(raw.value)
        self.quarantine.append({"file": raw.file, "row": raw.row, "field": _writable(field_name),
                                "reason": _writable(reason), "raw": None if text is None else _writable(text)})

    def summary(self) -> str:
        """A printable account: rows read, kept and quarantined per file and reason, and the split."""
        lines = []
        kept_per_file = Counter(p["source"].rsplit(":", 1)[0] for p in self.prompts)
        rejected = Counter((q["file"], q["reason"].split(":")[0]) for q in self.quarantine)
        for file, read in self.read_per_file.items():
            lines.append(f"{file}: {read} rows read, {kept_per_file[file]} kept, "
                         f"{sum(n for (f, _), n in rejected.items() if f == file)} quarantined")
            for (f, reason), n in sorted(rejected.items()):
                if f == file:
                    lines.append(f"    {n:5d}  {reason}")
        splits = Counter(p["split"] for p in self.prompts)
        domains = Counter(p["domain"] or "-" for p in self.prompts)
        lines.append(f"prompts: {len(self.prompts)} ({splits['train']} train, {splits['heldout']} held out); "
                     f"domains: {', '.join(f'{d} {n}' for d, n in sorted(domains.items()))}")
        if self.left_out:
            lines.append(f"left out: {self.left_out} valid training prompts beyond data.max_prompts "
                         "(a seeded sample is kept)")
        if self.quarantine:
            lines.append(f"quarantined: {len(self.quarantine)} rows")
        return "\n".join(lines)


def _writable(text: str) -> str:
    """Text any file can hold: a lone surrogate (which JSON can spell) is written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def ingest(data: DataConfig, template: TemplateConfig, tokenizer, fmt: str | None = None) -> IngestResult:
    """Read every source of `data`, keep valid unique rows within the token budget, assign splits."""
    result = IngestResult()
    longest = max(len(token.encode()) for token in tokenizer.get_vocab())  # bytes, at most, that one token covers
    seen_content: dict[str, str] = {}  # prompt_id -> "file:row" of its first occurrence
    seen_source_ids: dict[str, tuple[str, str]] = {}  # id given by the source -> (prompt_id, "file:row")
    for spec in data.sources:
        for raw in read_source(spec):
            if raw.row > 0:
                result.read_per_file[raw.file] += 1
            else:
                result.read_per_file.setdefault(raw.file, 0)
            if raw.value is None:
                result.reject(raw, raw.field if raw.row else "<file>", raw.error)
                continue
            where = f"{raw.file}:{raw.row}"
            try:
                row = normalize(raw.value, fmt or data.format)
            except RowError as err:
                result.reject(raw, err.field, err.reason)
                continue
            pid = prompt_id(row["messages"], row["rubric"])
            if pid in seen_content:
                result.reject(raw, "prompt_id", f"duplicate prompt: same messages and rubric as {seen_content[pid]}")
                continue
            if row["source_id"] is not None and row["source_id"] in seen_source_ids:
                _, first = seen_source_ids[row["source_id"]]
                result.reject(raw, "id", f"duplicate id {row['source_id']!r} with different content (first at {first})")
                continue
            canonical = {"prompt_id": pid, "messages": row["messages"], "rubric": row["rubric"], "source": where,
                         "source_id": row["source_id"], "domain": row["domain"],
                         "reference_answer": row["reference_answer"]}
            try:
                messages = teacher_messages(canonical, template)
            except ValueError as err:  # e.g. a reference-answer teacher and a row without one
                result.reject(raw, "reference_answer", str(err))
                continue
            # A row certainly over the budget is refused before it is tokenized: a 50 MB prompt took the chat template
            # and the tokenizer 50 s and 12 GB. No token covers more than `longest` bytes, so this is a lower bound.
            size = sum(len(m["content"].encode()) for m in messages)
            if size // longest > data.max_prompt_tokens:
                result.reject(raw, "prompt", f"over the token budget: the teacher prompt is {size:,} bytes, at least "
                                             f"{size // longest:,} tokens; data.max_prompt_tokens is "
                                             f"{data.max_prompt_tokens}")
                continue
            teacher_len = len(chat_ids(tokenizer, messages))
            if teacher_len > data.max_prompt_tokens:
                result.reject(raw, "prompt", f"over the token budget: the teacher prompt is {teacher_len} tokens, "
                                             f"data.max_prompt_tokens is {data.max_prompt_tokens}")
                continue
            seen_content[pid] = where
            if row["source_id"] is not None:
                seen_source_ids[row["source_id"]] = (pid, where)
            # By question, not by prompt_id: the same question with another rubric must not train what it evaluates.
            held = heldout(question_id(row["messages"]), data.heldout_fraction, data.split_seed)
            canonical["split"] = "heldout" if held else "train"
            canonical["prompt_tokens"] = len(chat_ids(tokenizer, student_messages(canonical, template)))
            result.prompts.append(canonical)
    if data.max_prompts:
        # A seeded sample rather than the first N rows, so a small run still mixes the sources' domains.
        train = sorted((p for p in result.prompts if p["split"] == "train"),
                       key=lambda p: split_draw(p["prompt_id"], data.split_seed + 1))
        keep = {p["prompt_id"] for p in train[: data.max_prompts]}
        result.left_out = len(train) - len(keep)
        result.prompts = [p for p in result.prompts if p["split"] == "heldout" or p["prompt_id"] in keep]
    return result
