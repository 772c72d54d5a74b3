"""Build `builtin:checkable`: rubric prompts whose every criterion also carries a machine-checkable predicate.

    python bench/make_checkable.py            # writes rgsd_pipeline/data/checkable.jsonl
    python bench/make_checkable.py --check    # exits 1 when the committed file differs from what this builds

Each topic of bench/data/checkable_{medical,science}.txt (written for this project) gives a question and two
criteria specific to it, with the terms that show each one in an answer. Every prompt also gets two generic
criterion kinds of its domain, in rotation (so held-out prompts share kinds, not prompts), and two pitfalls.
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
OUT = ROOT / "rgsd_pipeline" / "data" / "checkable.jsonl"

CLINICIAN = ["doctor*", "physician*", "clinician*", "GP", "healthcare provider*", "health care provider*",
             "medical attention", "medical advice", "medical help", "pharmacist*", "nurse*", "emergency"]
# (kind, criterion text, points, predicate) of the generic criteria each domain rotates through.
GENERIC = {
    "medical": [
        ("clinician", "Advises seeing a doctor or other clinician if symptoms persist, worsen or are severe.", 3,
         {"any": CLINICIAN}),
        ("brevity", "Keeps the whole answer under 120 words.", 2, {"max_words": 120}),
        ("summary", "Ends with a final one-sentence line that begins with 'In summary'.", 2,
         {"last_line_starts": ["In summary"]}),
        ("numbered", "Presents the main points as a numbered list (1., 2., ...).", 2, {"numbered_list": 2}),
    ],
    "science": [
        ("example", "Gives a concrete everyday example, introduced with 'for example' or 'for instance'.", 2,
         {"any": ["for example", "for instance"]}),
        ("brevity", "Keeps the whole answer under 120 words.", 2, {"max_words": 120}),
        ("summary", "Ends with a final one-sentence line that begins with 'In summary'.", 2,
         {"last_line_starts": ["In summary"]}),
        ("numbered", "Presents the main points as a numbered list (1., 2., ...).", 2, {"numbered_list": 2}),
    ],
}
PITFALLS = [
    ("leakage", "Refers to hidden evaluation criteria, a rubric or grading.", -3,
     {"any": ["rubric*", "criteria", "criterion", "grading"]}),
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


def topics(domain: str) -> list[tuple[str, str, list[str], str, list[str]]]:
    rows = []
    for number, line in enumerate(TOPICS[domain].read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(" | ")]
        if len(fields) != 5:
            raise SystemExit(f"{TOPICS[domain]}:{number}: expected 5 fields separated by ' | ', got {len(fields)}")
        question, a, terms_a, b, terms_b = fields
        rows.append((question, a, [t.strip() for t in terms_a.split(",")], b, [t.strip() for t in terms_b.split(",")]))
    return rows


def build() -> list[dict]:
    from rgsd_pipeline.rule_judge import check

    rows = []
    for domain in ("medical", "science"):
        generic = GENERIC[domain]
        for index, (question, a, terms_a, b, terms_b) in enumerate(topics(domain)):
            for terms in (terms_a, terms_b):  # a criterion the question already meets would measure nothing
                met, _ = check({"any": terms}, question)
                if met:
                    raise SystemExit(f"{domain} topic {index + 1}: the question itself contains one of {terms}")
            first, second = generic[index % len(generic)], generic[(index + 1 + index // len(generic)) % len(generic)]
            if second == first:
                second = generic[(index + 1) % len(generic)]
            rubric = [criterion("concept", a, 4, {"any": terms_a}), criterion("concept", b, 3, {"any": terms_b}),
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
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in build())
    if args.check:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} differs from what bench/make_checkable.py builds; rerun it")
        return
    OUT.write_text(text)
    print(f"wrote {len(text.splitlines())} prompts to {OUT}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
