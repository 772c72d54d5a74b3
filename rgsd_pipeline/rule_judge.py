"""A judge for CPUs: grades criteria that carry a machine-checkable predicate, deterministically.

A criterion's predicate sits in its tags as `check:<JSON>` (tags are never shown to the teacher or the
student). Predicates:

    {"any": [terms]}                 the answer contains one of the terms
    {"all": [terms]}                 ... all of them
    {"all_of": [[terms], ...]}       ... one term of every group
    {"sentence": [[terms], ...]}     one sentence contains one term of every group ("insulin" + "no longer made")
    {"max_words": n}, {"min_words": n}
    {"numbered_list": n}             at least n lines that start "1." / "2)" ...
    {"last_line_starts": [prefixes]} the last non-empty line begins with one of them (markdown emphasis ignored)
    {"final_sentence_starts": [prefixes]}  ... and is one finished sentence (a cut-off answer does not end in one)
    {"number_with_unit": [units]}    a number followed by one of the units
    {"regex": pattern}               a case-insensitive regular expression matches
    {"not": predicate}, {"and": [predicates]}, {"or": [predicates]}

Terms are case-insensitive and match whole words; a trailing `*` matches any ending ("vaccin*"). A
criterion with negative points is a pitfall: it is met when the answer does the undesirable thing, and
its points are subtracted (grading.py). A criterion without a predicate gets no verdict (`met` null):
this judge cannot grade it, and it is counted and left out of the score, never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rgsd_pipeline.judge import Item, Verdict

RULES_VERSION = 2  # bump when a predicate's meaning changes
CHECK_TAG = "check:"
KIND_TAG = "kind:"


class PredicateError(ValueError):
    """A `check:` tag that is not a predicate this judge knows."""


def _term_pattern(term: str) -> str:
    stem, wild = (term[:-1], r"\w*") if term.endswith("*") else (term, "")
    return rf"(?<!\w){re.escape(stem)}{wild}(?!\w)"


def _found(term: str, text: str) -> bool:
    return re.search(_term_pattern(term), text, re.IGNORECASE) is not None


def _words(text: str) -> int:
    return len(re.findall(r"\w[\w'-]*", text))


def _terms(predicate: dict, key: str) -> list[str]:
    terms = predicate[key]
    if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip("*") for t in terms):
        raise PredicateError(f"{key!r} needs a non-empty list of terms, got {terms!r}")
    return terms


def _groups(predicate: dict, key: str) -> list[list[str]]:
    groups = predicate[key]
    if not isinstance(groups, list) or not groups:
        raise PredicateError(f"{key!r} needs a non-empty list of term lists, got {groups!r}")
    return [_terms({key: group}, key) for group in groups]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _last_line(text: str) -> str:
    lines = [line.strip().lstrip("*_#> ").strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _one_sentence(line: str) -> bool:
    """A line that is one finished sentence: it ends a sentence, and ends none before that."""
    body = line.rstrip("*_ ")
    return bool(re.search(r"[.!?][\"')\]]*$", body)) and not re.search(r"[.!?][\"')\]]*\s+\S", body)


def _predicates(predicate: dict, key: str) -> list[dict]:
    parts = predicate[key]
    if not isinstance(parts, list) or not parts:
        raise PredicateError(f"{key!r} needs a non-empty list of predicates, got {parts!r}")
    return parts


def check(predicate: dict, answer: str) -> tuple[bool, str]:
    """(met, evidence) of one predicate on an answer; PredicateError when the predicate is malformed."""
    text = answer.replace("\u2019", "'")
    if not isinstance(predicate, dict) or len(predicate) != 1:
        raise PredicateError(f"a predicate is an object with one key, got {predicate!r}")
    (kind, value), = predicate.items()
    if kind in ("any", "all"):
        found = [t for t in _terms(predicate, kind) if _found(t, text)]
        met = bool(found) if kind == "any" else len(found) == len(value)
        return met, f"found {found}" if found else "none of the terms found"
    if kind == "all_of":
        found = [next((t for t in group if _found(t, text)), None) for group in _groups(predicate, kind)]
        return None not in found, f"found {[f for f in found if f]}, {found.count(None)} group(s) missing"
    if kind == "sentence":
        groups = _groups(predicate, kind)
        for sentence in _sentences(text):
            found = [next((t for t in group if _found(t, sentence)), None) for group in groups]
            if None not in found:
                return True, f"found {found} in {sentence.strip()[:60]!r}"
        return False, "no sentence holds a term of every group"
    if kind in ("and", "or"):
        results = [check(part, answer) for part in _predicates(predicate, kind)]
        met = all(m for m, _ in results) if kind == "and" else any(m for m, _ in results)
        return met, f"{kind} (" + "; ".join(evidence for _, evidence in results) + ")"
    if kind == "final_sentence_starts":
        last = _last_line(text)
        met = any(last.lower().startswith(p.lower()) for p in _terms(predicate, kind)) and _one_sentence(last)
        return met, f"last line: {last[:60]!r}"
    if kind in ("max_words", "min_words"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PredicateError(f"{kind!r} needs a whole number, got {value!r}")
        words = _words(text)
        return (words <= value if kind == "max_words" else words >= value), f"{words} words"
    if kind == "numbered_list":
        if not isinstance(value, int) or isinstance(value, bool):
            raise PredicateError(f"'numbered_list' needs a whole number, got {value!r}")
        items = len(re.findall(r"^\s*\d+[.)]\s+\S", text, re.MULTILINE))
        return items >= value, f"{items} numbered lines"
    if kind == "last_line_starts":
        last = _last_line(text)
        met = any(last.lower().startswith(p.lower()) for p in _terms(predicate, kind))
        return met, f"last line: {last[:60]!r}"
    if kind == "number_with_unit":
        units = "|".join(re.escape(u) for u in _terms(predicate, kind))
        match = re.search(rf"\d[\d,.]*\s*(?:{units})(?!\w)", text, re.IGNORECASE)
        return match is not None, f"found {match.group()!r}" if match else "no number with a unit"
    if kind == "regex":
        try:
            match = re.search(value, text, re.IGNORECASE)
        except (re.error, TypeError) as err:
            raise PredicateError(f"'regex' is not a valid pattern: {err}") from None
        return match is not None, f"matched {match.group()[:60]!r}" if match else "no match"
    if kind == "not":
        met, evidence = check(value, answer)
        return not met, f"not ({evidence})"
    raise PredicateError(f"unknown predicate {kind!r}")


def predicate_of(tags) -> dict | None:
    """The predicate in a criterion's tags (None when it has none); PredicateError when it is not JSON."""
    for tag in tags:
        if tag.startswith(CHECK_TAG):
            try:
                return json.loads(tag[len(CHECK_TAG):])
            except json.JSONDecodeError as err:
                raise PredicateError(f"the check tag is not JSON: {err.msg}") from None
    return None


def check_gradable(prompts: list[dict], where: str) -> None:
    """Refuse, before any answer is sampled, an evaluation set none of whose criteria the rule judge can grade."""
    criteria = [criterion for prompt in prompts for criterion in prompt["rubric"]]
    if criteria and not any(tag.startswith(CHECK_TAG) for criterion in criteria for tag in criterion["tags"]):
        from rgsd_pipeline.errors import UserError

        raise UserError(f"--judge rules: none of the {len(criteria)} criteria of {where} ({len(prompts)} prompts) "
                        f"carries a machine-checkable predicate (a '{CHECK_TAG}...' tag), so the rule judge could "
                        "grade nothing. Use an LLM judge (--judge llm --judge-url URL --judge-model NAME), or data "
                        "whose criteria carry predicates (builtin:checkable, builtin:howto)")


def kind_of(tags) -> str | None:
    """The criterion kind a data set labelled it with (`kind:...`), for per-kind reports."""
    return next((tag[len(KIND_TAG):] for tag in tags if tag.startswith(KIND_TAG)), None)


@dataclass
class RuleStats:
    judged: int = 0
    unjudgeable: int = 0  # criteria without a predicate: no verdict
    unparseable: int = 0  # predicates this judge does not understand: no verdict

    def line(self) -> str:
        return (f"{self.judged} criteria judged by rules, {self.unjudgeable} without a predicate and "
                f"{self.unparseable} with a malformed one (no verdict, left out of the score)")


class RuleJudge:
    """The grader of machine-checkable predicates, for grading.grade_answers (the LLM judge's interface)."""

    name = "rules"

    def __init__(self):
        self.stats = RuleStats()

    def identity(self) -> dict:
        return {"judge_model": "rules", "judge_mode": f"predicates-v{RULES_VERSION}"}

    def describe(self) -> str:
        return "the rule judge (machine-checkable predicates in criterion tags)"

    def grade(self, items: list[Item], on_progress=None) -> list[list[Verdict]]:
        graded = []
        for item in items:
            verdicts = []
            for criterion in item.criteria:
                try:
                    predicate = predicate_of(criterion.tags)
                    if predicate is None:
                        self.stats.unjudgeable += 1
                        verdicts.append(Verdict(None, "no machine-checkable predicate: not judged by rules"))
                        continue
                    met, evidence = check(predicate, item.answer)
                except PredicateError as err:
                    self.stats.unparseable += 1
                    verdicts.append(Verdict(None, f"unparseable predicate: {err}"))
                    continue
                self.stats.judged += 1
                verdicts.append(Verdict(met, evidence))
            graded.append(verdicts)
            if on_progress:
                on_progress(1)
        return graded

    def close(self) -> None:
        pass
