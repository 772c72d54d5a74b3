"""Build `builtin:checkable` and `builtin:howto`: rubric prompts whose every criterion carries a machine-checkable
predicate.

    python bench/make_checkable.py            # writes rgsd_pipeline/data/{checkable,howto}.jsonl
    python bench/make_checkable.py --check    # exits 1 when a committed file differs from what this builds

Each topic of bench/data/checkable_{medical,science}.txt (written for this project) gives a question and two
criteria specific to it, with the terms that show each one in an answer: alternatives, and groups that must all
appear, in one sentence ("insulin + make*, no longer") or anywhere ("soap & twenty seconds"), so that a predicate asks
for what its criterion asks and not for one word of it (hand labels measure how well: bench/agreement.py).
Every prompt also gets two generic criterion kinds of its domain, in rotation (so held-out prompts share kinds, not
prompts), and two pitfalls.
Criteria are ordinary rubric text, which is what the teacher reads; the predicate sits in the criterion's
tags (`check:{...}`, `kind:...`), which no model ever sees. The rule judge (rgsd_pipeline/rule_judge.py)
grades the predicates. Each row's reference answer (for the reference-answer teacher of the paper's
ablation) states the two specific criteria as key points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = {"medical": ROOT / "bench" / "data" / "checkable_medical.txt",
          "science": ROOT / "bench" / "data" / "checkable_science.txt"}
OUT = {"checkable": ROOT / "rgsd_pipeline" / "data" / "checkable.jsonl",
       "howto": ROOT / "rgsd_pipeline" / "data" / "howto.jsonl"}

CLINICIAN = ["doctor*", "physician*", "clinician*", "GP", "healthcare provider*", "health care provider*",
             "medical attention", "medical advice", "medical help", "pharmacist*", "nurse*", "emergency"]
# A cut-off answer does not end with a finished sentence, whatever its last line begins with.
SUMMARY = ("summary", "Ends with a final one-sentence line that begins with 'In summary'.", 2,
           {"final_sentence_starts": ["In summary"]})
# (kind, criterion text, points, predicate) of the generic criteria each domain rotates through.
GENERIC = {
    "medical": [
        ("clinician", "Advises seeing a doctor or other clinician if symptoms persist, worsen or are severe.", 3,
         {"any": CLINICIAN}),
        ("brevity", "Keeps the whole answer under 120 words.", 2, {"max_words": 120}),
        SUMMARY,
        ("numbered", "Presents the main points as a numbered list (1., 2., ...).", 2, {"numbered_list": 2}),
    ],
    "science": [
        ("example", "Gives a concrete everyday example, introduced with 'for example' or 'for instance'.", 2,
         {"any": ["for example", "for instance"]}),
        ("brevity", "Keeps the whole answer under 120 words.", 2, {"max_words": 120}),
        SUMMARY,
        ("numbered", "Presents the main points as a numbered list (1., 2., ...).", 2, {"numbered_list": 2}),
    ],
}
# builtin:howto: the same questions, each with the same three criteria about how to answer (no content criterion), so
# that the demo measures the mechanism where the 135M teacher has something to teach: reading these, it keeps to 80
# words far more often than the base model does (README, "What the demo measures").
HOWTO = [("brevity", "Keeps the whole answer under 80 words.", 2, {"max_words": 80}),
         GENERIC["medical"][3], GENERIC["science"][0]]
PITFALLS = [
    # Reciting the hidden instructions counts: "a good response should", the 120-word limit, a quoted 'In summary'.
    ("leakage", "Refers to hidden evaluation criteria, a rubric or grading.", -3,
     {"or": [{"any": ["rubric*", "criteria", "criterion", "grading", "good response", "120 words"]},
             {"regex": "[\"'\u201c\u2018]in summary"}]}),
    ("ai_disclaimer", "Describes itself as an AI or a language model.", -2,
     {"any": ["as an AI", "I am an AI", "I'm an AI", "language model"]}),
]


LEADS = ("Explains that ", "Explains ", "Says that ", "Says ", "States that ", "Mentions that ", "Mentions ", "Names ",
         "Describes ", "Gives ", "Calls ")


def key_point(text: str) -> str:
    """A criterion restated as content: "Explains that the body makes no insulin" -> "the body makes no insulin"."""
    for lead in LEADS:
        if text.startswith(lead):
            return text[len(lead):]
    return text[0].lower() + text[1:]


def criterion(kind: str, text: str, points: int, predicate: dict) -> dict:
    return {"criterion": text, "points": points,
            "tags": [f"kind:{kind}", "check:" + json.dumps(predicate, sort_keys=True)]}


def predicate_of_terms(terms: str) -> dict:
    """The predicate of a terms field: "a, b" -> any; "a + b, c" -> one sentence with a and (b or c); "a & b" -> both
    anywhere; parts joined by "&" may themselves be sentence groups."""
    parts = [[[t.strip() for t in group.split(",")] for group in part.split(" + ")] for part in terms.split(" & ")]
    if len(parts) == 1:
        groups = parts[0]
        return {"any": groups[0]} if len(groups) == 1 else {"sentence": groups}
    if all(len(groups) == 1 for groups in parts):
        return {"all_of": [groups[0] for groups in parts]}
    return {"and": [{"any": groups[0]} if len(groups) == 1 else {"sentence": groups} for groups in parts]}


def topics(domain: str) -> list[tuple[str, str, dict, str, dict]]:
    rows = []
    for number, line in enumerate(TOPICS[domain].read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(" | ")]
        if len(fields) != 5:
            raise SystemExit(f"{TOPICS[domain]}:{number}: expected 5 fields separated by ' | ', got {len(fields)}")
        question, a, terms_a, b, terms_b = fields
        rows.append((question, a, predicate_of_terms(terms_a), b, predicate_of_terms(terms_b)))
    return rows


def build_howto() -> list[dict]:
    """builtin:howto: every question of builtin:checkable with the HOWTO criteria and the pitfalls."""
    return [{**row, "Rubrics": [criterion(*c) for c in (*HOWTO, *PITFALLS)],
             "reference_answer": None, "extra_info": {"id": row["extra_info"]["id"].replace("checkable", "howto")}}
            for row in build()]


def build() -> list[dict]:
    from rgsd_pipeline.rule_judge import check

    rows = []
    for domain in ("medical", "science"):
        generic = GENERIC[domain]
        for index, (question, a, check_a, b, check_b) in enumerate(topics(domain)):
            for predicate in (check_a, check_b):  # a criterion the question already meets would measure nothing
                met, _ = check(predicate, question)
                if met:
                    raise SystemExit(f"{domain} topic {index + 1}: the question itself meets {predicate}")
            first, second = generic[index % len(generic)], generic[(index + 1 + index // len(generic)) % len(generic)]
            if second == first:
                second = generic[(index + 1) % len(generic)]
            rubric = [criterion("concept", a, 4, check_a), criterion("concept", b, 3, check_b),
                      criterion(*first), criterion(*second), *(criterion(*p) for p in PITFALLS)]
            # The reference answer of the paper's ablation: the content of the two specific criteria, none of the
            # format the generic ones ask for.
            reference = f"Key points: {key_point(a)}; {key_point(b)}."
            rows.append({"prompt": [{"role": "user", "content": question}], "Rubrics": rubric, "domain": domain,
                         "reference_answer": reference, "extra_info": {"id": f"checkable-{domain[0]}{index + 1:03d}"}})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args()
    for name, rows in (("checkable", build()), ("howto", build_howto())):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if args.check:
            if not OUT[name].exists() or OUT[name].read_text() != text:
                sys.exit(f"{OUT[name]} differs from what bench/make_checkable.py builds; rerun it")
            continue
        OUT[name].write_text(text)
        print(f"wrote {len(rows)} prompts to {OUT[name]}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
