"""Build the lm-evaluation-harness task bundled for `evaluate --lm-eval rgsd_arithmetic`: generated arithmetic with
checkable answers, a capability check that needs no download.

    python bench/make_lm_eval_task.py            # writes rgsd_pipeline/data/lm_eval/rgsd_arithmetic.jsonl
    python bench/make_lm_eval_task.py --check    # exits 1 when the committed file differs from what this builds

300 seeded items, 100 of each kind: the sum of two two-digit numbers, their difference (never negative), and a
one-digit number times a two-digit one. Each item is multiple choice over four numbers: the answer and three near
misses a model that half-knows arithmetic would pick (off by one, off by ten, the digits of the answer swapped, or
the answer of a neighbouring operation), in a seeded order, so chance is 0.25 and the answer is known exactly.
lm-eval scores it by the log-likelihood of each choice after "Answer:" (rgsd_arithmetic.yaml beside the data).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "rgsd_pipeline" / "data" / "lm_eval" / "rgsd_arithmetic.jsonl"
PER_KIND = 100
SEED = 0


def near_misses(answer: int, neighbour: int) -> list[int]:
    """Wrong answers close to `answer`, in a fixed order of preference (duplicates and negatives dropped later)."""
    swapped = int(str(answer)[::-1]) if answer >= 10 and str(answer)[::-1] != str(answer) else answer + 2
    return [answer + 1, answer - 1, answer + 10, answer - 10, swapped, neighbour, answer + 2, answer - 2]


def item(kind: str, rng: random.Random, index: int) -> dict:
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question, answer, neighbour = f"What is {a} + {b}?", a + b, abs(a - b)
    elif kind == "subtract":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        question, answer, neighbour = f"What is {a} - {b}?", a - b, a + b
    else:
        a, b = rng.randint(2, 9), rng.randint(10, 99)
        question, answer, neighbour = f"What is {a} x {b}?", a * b, a + b
    wrong = []
    for candidate in near_misses(answer, neighbour):
        if candidate >= 0 and candidate != answer and candidate not in wrong:
            wrong.append(candidate)
    picked = rng.sample(wrong[:5], 3)
    choices = [answer, *picked]
    rng.shuffle(choices)
    return {"id": f"{kind}-{index:03d}", "kind": kind, "question": question,
            "choices": [str(c) for c in choices], "answer": choices.index(answer)}


def build() -> str:
    rng = random.Random(SEED)
    rows = [item(kind, rng, i) for kind in ("add", "subtract", "multiply") for i in range(PER_KIND)]
    return "".join(json.dumps(row) + "\n" for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args()
    text = build()
    if args.check:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {text.count(chr(10))} items to {OUT}")


if __name__ == "__main__":
    main()
