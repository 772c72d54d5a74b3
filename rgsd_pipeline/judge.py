"""Grading answers against rubric criteria with an LLM judge over the OpenAI-compatible chat API.

The judge appears only at evaluation time (docs/architecture.md, "Evaluation"). Two ways to ask:

- `per-criterion` (HealthBench style): one call per (answer, criterion), verdict `{"explanation", "met"}`;
- `per-answer` (as the RGSD paper grades): one call per answer, `{"verdicts": [{"explanation", "met"}, ...]}`
  with one entry per criterion, in rubric order.

Requests carry a JSON schema as `response_format` (structured output) unless the server refuses it, in
which case the judge falls back to plain JSON instructions once and says so. Calls run concurrently up
to a bound; transport errors, timeouts, 429s and 5xx responses are retried with exponential backoff by
the client; a reply that does not parse is asked again `parse_retries` times and is then recorded as
unparseable (`met` None), never dropped. Parsed verdicts go to an SQLite cache keyed by judge model,
mode, prompt, answer hash and criterion, so a rerun over the same answers makes no calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from rgsd_pipeline.errors import UserError

PROMPT_VERSION = 1  # bump when the grader instructions change: cached verdicts then no longer apply
MODES = ("per-criterion", "per-answer")
STRUCTURED = ("auto", "json_schema", "none")
EXPLANATION_CHARS = 300


class JudgeError(UserError, RuntimeError):
    """The judge cannot be used at all (unreachable server, unknown model): a user-fixable error."""


@dataclass(frozen=True)
class Criterion:
    text: str
    points: float
    tags: tuple[str, ...] = ()  # e.g. the machine-checkable predicate a rule judge reads (never shown to models)


@dataclass(frozen=True)
class Item:
    """One answer to grade: the conversation it answers, the answer, and the rubric."""

    prompt_id: str
    messages: tuple  # ({"role", "content"}, ...)
    answer: str
    criteria: tuple[Criterion, ...]


@dataclass
class Verdict:
    met: bool | None  # None: the judge's reply could not be parsed (or the call failed)
    explanation: str
    cached: bool = False


@dataclass
class JudgeStats:
    calls: int = 0
    cache_hits: int = 0
    unparseable: int = 0  # verdicts left as None: replies that never parsed, or failed calls
    failed_calls: int = 0  # calls refused, or still failing after the client's own retries
    fallback: str = ""  # why structured output was turned off, if it was

    def line(self) -> str:
        text = (f"{self.calls} judge calls, {self.cache_hits} verdicts from the cache, "
                f"{self.unparseable} verdicts missing (unparseable replies or {self.failed_calls} failed calls)")
        return text + (f"; {self.fallback}" if self.fallback else "")


@dataclass
class JudgeSettings:
    url: str
    model: str
    mode: str = "per-answer"
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 4
    parse_retries: int = 1
    structured: str = "auto"
    max_tokens: int = 1024
    api_key_env: str = "RGSD_JUDGE_API_KEY"
    extra: dict = field(default_factory=dict)  # extra request fields, e.g. {"seed": 0}

    def slug(self) -> str:
        """A folder-safe name for this judge and mode."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.model).strip("_") + "-" + self.mode


SYSTEM = ("You are an expert grader. You check one response to a conversation against rubric criteria "
          "and decide, for each criterion, whether the response meets it. A criterion with negative points "
          "describes something a response should avoid: it is met when the response does that undesirable "
          "thing. Judge only what the response says; do not reward length. Reply with JSON only.")


def render_conversation(messages) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def criterion_request(item: Item, criterion: Criterion) -> list[dict]:
    user = (f"<conversation>\n{render_conversation(item.messages)}\n</conversation>\n\n"
            f"<response>\n{item.answer}\n</response>\n\n"
            f"<criterion points=\"{criterion.points:g}\">\n{criterion.text}\n</criterion>\n\n"
            'Does the response meet the criterion? Reply as {"explanation": "<one or two sentences>", '
            '"met": true or false}.')
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def answer_request(item: Item) -> list[dict]:
    listed = "\n".join(f"{i + 1}. ({c.points:g} points) {c.text}" for i, c in enumerate(item.criteria))
    user = (f"<conversation>\n{render_conversation(item.messages)}\n</conversation>\n\n"
            f"<response>\n{item.answer}\n</response>\n\n"
            f"<criteria>\n{listed}\n</criteria>\n\n"
            f"For each of the {len(item.criteria)} criteria, in order, decide whether the response meets it. Reply as "
            '{"verdicts": [{"explanation": "<one sentence>", "met": true or false}, ...]} with exactly '
            f"{len(item.criteria)} entries.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _verdict_schema() -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["explanation", "met"],
            "properties": {"explanation": {"type": "string", "maxLength": EXPLANATION_CHARS},
                           "met": {"type": "boolean"}}}


def response_schema(n_criteria: int | None) -> dict:
    """JSON schema of a reply: one verdict, or exactly `n_criteria` verdicts in order."""
    if n_criteria is None:
        return _verdict_schema()
    return {"type": "object", "additionalProperties": False, "required": ["verdicts"],
            "properties": {"verdicts": {"type": "array", "items": _verdict_schema(),
                                        "minItems": n_criteria, "maxItems": n_criteria}}}


def _json_object(text: str):
    """The JSON object in a reply, allowing a Markdown code fence or prose around it."""
    text = (text or "").strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text, strict=False)  # control characters inside strings are tolerated
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            return json.loads(text[start:end + 1], strict=False)
        except json.JSONDecodeError:
            return None


def _one(obj) -> Verdict | None:
    if not isinstance(obj, dict):
        return None
    met = obj.get("met", obj.get("criteria_met"))
    if isinstance(met, str) and met.strip().lower() in ("true", "false", "yes", "no"):
        met = met.strip().lower() in ("true", "yes")
    if not isinstance(met, bool):
        return None
    return Verdict(met=met, explanation=str(obj.get("explanation", ""))[:2000])


def parse_reply(text: str, n_criteria: int | None) -> list[Verdict] | None:
    """Verdicts from a judge reply (one, or `n_criteria` in order), or None when it does not parse."""
    obj = _json_object(text)
    if n_criteria is None:
        verdict = _one(obj)
        return [verdict] if verdict else None
    entries = obj.get("verdicts") if isinstance(obj, dict) else obj
    if not isinstance(entries, list) or len(entries) != n_criteria:
        return None
    verdicts = [_one(e) for e in entries]
    return None if any(v is None for v in verdicts) else verdicts


def answer_hash(answer: str) -> str:
    return hashlib.sha256(answer.encode()).hexdigest()


class VerdictCache:
    """Verdicts on disk (SQLite), keyed by judge model, mode, prompt, answer hash and criterion.

    The ranks of a data-parallel job share one cache file: a writer waits up to BUSY_SECONDS for another's
    transaction (SQLite's default of 5 s was exceeded by 8 ranks grading at once), and WAL lets readers go on."""

    BUSY_SECONDS = 600.0

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=self.BUSY_SECONDS)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, met INTEGER NOT NULL, "
                        "explanation TEXT NOT NULL, judge TEXT NOT NULL)")

    @staticmethod
    def key(settings: JudgeSettings, item: Item, criterion: Criterion) -> str:
        parts = [PROMPT_VERSION, settings.model, settings.mode, item.prompt_id, answer_hash(item.answer),
                 criterion.text, criterion.points]
        if settings.mode == "per-answer":  # the other criteria are part of what the judge saw
            parts.append([[c.text, c.points] for c in item.criteria])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> Verdict | None:
        row = self.db.execute("SELECT met, explanation FROM verdicts WHERE key = ?", (key,)).fetchone()
        return Verdict(met=bool(row[0]), explanation=row[1], cached=True) if row else None

    def put_many(self, entries: list[tuple[str, Verdict]], judge: str) -> None:
        with self.db:  # one transaction: all verdicts of a call or none
            self.db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                                [(k, int(v.met), v.explanation, judge) for k, v in entries if v.met is not None])

    def close(self) -> None:
        self.db.close()


class Judge:
    """An LLM judge over the OpenAI-compatible chat API; a grader for grading.grade_answers.

    Graders share this interface: `name` (folder-safe, names verdicts-<name>/ and summary-<name>.json),
    `identity()` (what the verdicts depend on), `describe()`, `grade(items, on_progress)`, `stats`, `close()`.
    """

    def __init__(self, settings: JudgeSettings, cache: VerdictCache):
        from openai import AsyncOpenAI

        if settings.mode not in MODES:
            raise JudgeError(f"judge mode {settings.mode!r} is not one of {', '.join(MODES)}")
        if settings.structured not in STRUCTURED:
            raise JudgeError(f"judge structured output {settings.structured!r} is not one of {', '.join(STRUCTURED)}")
        self.settings = settings
        self.cache = cache
        self.stats = JudgeStats()
        self.structured = settings.structured != "none"
        self.client = None  # one per grade() call: an async client belongs to the event loop it was opened in
        self._client = lambda: AsyncOpenAI(base_url=settings.url, api_key=os.environ.get(settings.api_key_env, "EMPTY"),
                                           timeout=settings.timeout_s, max_retries=settings.max_retries)

    @property
    def name(self) -> str:
        return self.settings.slug()

    def identity(self) -> dict:
        return {"judge_model": self.settings.model, "judge_mode": self.settings.mode}

    def describe(self) -> str:
        return f"{self.settings.model} at {self.settings.url} ({self.settings.mode})"

    def close(self) -> None:
        self.cache.close()

    async def check(self) -> None:
        """Fail early, naming the URL, when the server cannot be reached or does not serve the model."""
        import openai

        try:
            served = [m.id async for m in self.client.models.list()]
        except openai.APIError as err:
            raise JudgeError(f"cannot reach the judge at {self.settings.url}: {err}") from err
        if served and self.settings.model not in served:
            raise JudgeError(f"the judge at {self.settings.url} does not serve {self.settings.model!r}; "
                             f"it serves: {', '.join(served)}")

    def grade(self, items: list[Item], on_progress=None) -> list[list[Verdict]]:
        """Verdicts for every criterion of every item, in order."""
        return asyncio.run(self._grade_all(items, on_progress))

    async def _grade_all(self, items: list[Item], on_progress) -> list[list[Verdict]]:
        self.client = self._client()
        await self.check()
        gate = asyncio.Semaphore(self.settings.concurrency)
        try:
            return await asyncio.gather(*(self._grade_item(item, gate, on_progress) for item in items))
        finally:
            await self.client.close()

    async def _grade_item(self, item: Item, gate: asyncio.Semaphore, on_progress) -> list[Verdict]:
        keys = [VerdictCache.key(self.settings, item, c) for c in item.criteria]
        cached = [self.cache.get(k) for k in keys]
        self.stats.cache_hits += sum(v is not None for v in cached)
        if self.settings.mode == "per-answer":
            if any(v is None for v in cached):
                fresh = await self._ask(answer_request(item), len(item.criteria), gate)
                cached = fresh if isinstance(fresh, list) else [Verdict(None, fresh) for _ in item.criteria]
                self._record(keys, cached)
        else:
            async def one(i: int) -> Verdict:
                if cached[i] is not None:
                    return cached[i]
                fresh = await self._ask(criterion_request(item, item.criteria[i]), None, gate)
                verdict = fresh[0] if isinstance(fresh, list) else Verdict(None, fresh)
                self._record([keys[i]], [verdict])
                return verdict
            cached = list(await asyncio.gather(*(one(i) for i in range(len(item.criteria)))))
        if on_progress:
            on_progress(1)
        return cached

    def _record(self, keys: list[str], verdicts: list[Verdict]) -> None:
        self.stats.unparseable += sum(v.met is None for v in verdicts)
        self.cache.put_many(list(zip(keys, verdicts, strict=True)), self.settings.model)

    async def _ask(self, messages: list[dict], n_criteria: int | None, gate) -> list[Verdict] | str:
        """Verdicts from the judge, or the reason there are none (unparseable replies, a failed call)."""
        import openai

        attempts, reason = 0, "unparseable judge reply"
        while attempts <= self.settings.parse_retries:
            request = {"model": self.settings.model, "messages": messages, "temperature": 0.0,
                       "max_tokens": self.settings.max_tokens, **self.settings.extra}
            if self.structured:
                request["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "verdicts" if n_criteria else "verdict", "schema": response_schema(n_criteria),
                    "strict": True}}
            async with gate:
                try:
                    self.stats.calls += 1
                    reply = await self.client.chat.completions.create(**request)
                except openai.BadRequestError as err:
                    about_format = any(w in str(err).lower() for w in ("response_format", "json_schema", "structured"))
                    if "response_format" in request and self.settings.structured == "auto" and about_format:
                        self.structured = False
                        self.stats.fallback = f"structured output refused by the server ({err.status_code}); plain JSON"
                        continue  # the same attempt again, without response_format
                    self.stats.failed_calls += 1
                    return f"judge refused the request: {err}"[:2000]
                except openai.APIError as err:  # after the client's own retries with backoff
                    self.stats.failed_calls += 1
                    return f"judge call failed: {err}"[:2000]
            choice = reply.choices[0] if reply.choices else None
            verdicts = parse_reply(choice.message.content if choice else "", n_criteria)
            if verdicts is not None:
                return verdicts
            cut = choice and choice.finish_reason == "length"
            reason = "unparseable judge reply" + (" (cut at max_tokens)" if cut else "")
            attempts += 1
        return reason
