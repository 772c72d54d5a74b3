"""Normalising rubric rows of every supported format into the canonical prompts row.

Formats (detected per row from its keys, or forced with `--format`):

- rubrichub:   {"prompt": [{role, content}...], "Rubrics": [{"criterion", "points"}...]}   (RubricHub v1)
- rar:         {"question": str, "rubric": [{"title", "description", "weight"}...]}        (Scale AI RaR)
- healthbench: {"prompt": [{role, content}...], "rubrics": [{"criterion", "points", "tags"}...]}
- generic:     messages from "messages" | "prompt" | "question" (a string or a message list), criteria
               from "rubric" | "rubrics" | "Rubrics" | "criteria", each {"criterion" | "description" |
               "title", "points" | "weight", "tags"?}

A row that breaks a rule raises RowError naming the field and the reason; prepare quarantines it.
Nothing is guessed: points must be JSON numbers (not text), RaR weights whole numbers and a RaR
"Pitfall Criteria" item negative; a row that gives two spellings of its prompt or rubric ("Rubrics" and
"rubrics") with different content is refused rather than one of them chosen. The source's own id
(RubricHub extra_info.id, HealthBench prompt_id, RaR id) is kept as `source_id`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers

from rgsd_pipeline.choices import RowFormat, names

ROLES = ("system", "developer", "user", "assistant")
FORMATS = names(RowFormat)
MESSAGE_KEYS = ("messages", "prompt", "question")
RUBRIC_KEYS = ("Rubrics", "rubrics", "rubric", "criteria")


class RowError(ValueError):
    """A row breaks a rule; `field` names where (e.g. "Rubrics[2].points")."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def detect_format(row: dict) -> str:
    if "Rubrics" in row and "prompt" in row:
        return "rubrichub"
    if "question" in row and "rubric" in row and not isinstance(row.get("question"), list):
        return "rar"
    if "prompt" in row and "rubrics" in row:
        return "healthbench"
    return "generic"


def _one_of(row: dict, keys: tuple[str, ...]) -> None:
    """Refuse a row that gives two of `keys` different values: rgsd-pipeline does not choose between them."""
    present = [k for k in keys if k in row]
    for other in present[1:]:
        if row[other] != row[present[0]]:
            raise RowError(f"{present[0]}/{other}", f"the row has both {present[0]!r} and {other!r} with different "
                                                    "content; keep one")


def _source_id(row: dict, fmt: str) -> str | None:
    """The data set's own id: RubricHub extra_info.id, HealthBench prompt_id, RaR id."""
    extra = row.get("extra_info")
    candidates = [("extra_info.id", extra.get("id"))] if isinstance(extra, dict) else []
    candidates += [("prompt_id", row.get("prompt_id")), ("id", row.get("id"))]
    for field, value in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise RowError(field, f"an id must be a string or an integer, got {type(value).__name__}")
        return _text(str(value), field)
    return None


def _text(value: str, field: str) -> str:
    """`value` when it is valid Unicode (JSON can spell lone surrogates, which no file or tokenizer can hold)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(field, f"invalid Unicode: {err.reason} at character {err.start}") from None
    return value


def normalize(row: dict, fmt: str = "auto") -> dict:
    """Canonical {messages, rubric, domain, reference_answer, source_id} for one row, or RowError."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    _one_of(row, MESSAGE_KEYS)
    _one_of(row, RUBRIC_KEYS)
    if fmt == "rubrichub":
        messages = _messages(row.get("prompt"), "prompt")
        rubric = _rubric(row.get("Rubrics"), "Rubrics", text_keys=("criterion",), points_keys=("points",))
    elif fmt == "rar":
        messages = _messages(row.get("question"), "question")
        rubric = _rubric(row.get("rubric"), "rubric", text_keys=("description", "title"), points_keys=("weight",),
                         rar=True)
    elif fmt == "healthbench":
        messages = _messages(row.get("prompt"), "prompt")
        rubric = _rubric(row.get("rubrics"), "rubrics", text_keys=("criterion",), points_keys=("points",))
    elif fmt == "generic":
        message_key = next((k for k in MESSAGE_KEYS if k in row), "messages")
        rubric_key = next((k for k in RUBRIC_KEYS if k in row), "rubric")
        messages = _messages(row.get(message_key), message_key)
        rubric = _rubric(row.get(rubric_key), rubric_key, text_keys=("criterion", "description", "title"),
                         points_keys=("points", "weight"))
    else:
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    domain_key = next((k for k in ("domain", "category") if row.get(k) is not None), None)
    domain = row[domain_key] if domain_key else ("medical" if fmt == "healthbench" else None)
    if domain is not None and not isinstance(domain, str):
        raise RowError(domain_key, f"must be a string, got {type(domain).__name__}")
    reference = row.get("reference_answer")
    if reference is not None and not isinstance(reference, str):
        raise RowError("reference_answer", f"must be a string, got {type(reference).__name__}")
    return {"messages": messages, "rubric": rubric,
            "domain": _text(domain, domain_key or "domain") if domain else None,
            "reference_answer": _text(reference, "reference_answer") if reference else None,
            "source_id": _source_id(row, fmt)}


def _messages(value, field: str) -> list[dict]:
    if value is None:
        raise RowError(field, "missing prompt")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty prompt")
        return [{"role": "user", "content": _text(value, field)}]
    if not isinstance(value, list):
        raise RowError(field, f"expected a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(field, "empty prompt: no messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"a message must be an object with role and content, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": _text(content, f"{where}.content")})
    if messages[-1]["role"] != "user":
        raise RowError(f"{field}[{len(messages) - 1}].role",
                       f"the last message must be from the user, got {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise RowError(f"{field}[{len(messages) - 1}].content", "empty prompt: the last user message is blank")
    return messages


def _number(value, field: str, integer: bool = False) -> float:
    """Points as given: a JSON number, never text that looks like one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "text" if isinstance(value, str) else type(value).__name__
        raise RowError(field, f"points must be a number, got {kind} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RowError(field, f"points must be finite, got {value!r}")
    if integer and not number.is_integer():
        raise RowError(field, f"RaR weights are whole numbers, got {value!r}")
    return number


PITFALL_PREFIX = "pitfall criteria"  # how RaR marks a criterion a response should avoid


def _rubric(value, field: str, text_keys: tuple, points_keys: tuple, rar: bool = False) -> list[dict]:
    if value is None:
        raise RowError(field, "missing rubric")
    if isinstance(value, str):  # some exports store the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(field, "rubric is a string that is not a JSON list of criteria") from None
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of criteria, got {type(value).__name__}")
    if not value:
        raise RowError(field, "empty rubric: no criteria")
    rubric = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RowError(where, f"a criterion must be an object, got {type(item).__name__}")
        text_key = next((k for k in text_keys if k in item), text_keys[0])
        text = item.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"{where}.{text_key}", "empty criterion" if isinstance(text, str) or text is None
                           else f"criterion must be a string, got {type(text).__name__}")
        points_key = next((k for k in points_keys if k in item), points_keys[0])
        if points_key not in item:
            raise RowError(f"{where}.{points_key}", "missing points")
        points = _number(item[points_key], f"{where}.{points_key}", integer=rar)
        pitfall = any(str(item.get(k, "")).strip().lower().startswith(PITFALL_PREFIX) for k in text_keys)
        if rar and pitfall and points > 0:
            raise RowError(f"{where}.{points_key}", f"a 'Pitfall Criteria' item needs a negative weight, got "
                                                    f"{points:g}; a positive one would reward the pitfall")
        tags = item.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RowError(f"{where}.tags", "tags must be a list of strings")
        if "title" in item and text_key != "title":
            if not isinstance(item["title"], str):
                raise RowError(f"{where}.title", f"title must be a string, got {type(item['title']).__name__}")
            tags = [*tags, f"title:{item['title']}"]
        rubric.append({"criterion": _text(text.strip(), f"{where}.{text_key}"), "points": points,
                       "tags": [_text(t, f"{where}.tags") for t in tags]})
    if not any(c["points"] > 0 for c in rubric):
        raise RowError(field, "no criterion has positive points, so rubric satisfaction is undefined")
    return rubric


def prompt_id(messages: list[dict], rubric: list[dict]) -> str:
    """A stable id: the first 16 hex digits of sha256 over the canonical messages and rubric."""
    canonical = json.dumps({"messages": messages, "rubric": [[c["criterion"], c["points"]] for c in rubric]},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def question_id(messages: list[dict]) -> str:
    """What decides a prompt's split: the first 16 hex digits of sha256 over its canonical messages alone, so one
    question asked with two rubrics (in one data set, or in two that share their questions, as builtin:howto and
    builtin:checkable do) lands in one split."""
    canonical = json.dumps({"messages": messages}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def split_draw(key: str, seed: int) -> float:
    """A seeded uniform draw in [0, 1) per key (a question_id or prompt_id), independent of row order."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def heldout(question: str, fraction: float, seed: int) -> bool:
    """Whether a question (its question_id) falls in the held-out split."""
    return split_draw(question, seed) < fraction
