"""How often the rule judge agrees with a person: accuracy and Cohen's kappa per criterion kind, on hand labels.

    python bench/agreement.py                          # the labels against the predicates of builtin:checkable
    python bench/agreement.py --data OLD.jsonl         # ... against another version's predicates
    python bench/agreement.py --batch 2                # one batch of labels only
    python bench/agreement.py --draw RUN [RUN ...]     # write a new, unlabelled draw (never over existing labels)

bench/data/agreement.yaml holds answers that SmolLM2-135M policies gave to held-out prompts of builtin:checkable
(the base model, the teacher itself, trained iterations), each with the criteria of its prompt labelled met / not met
by a person who read the answer, and why. The criteria are looked up by the prompt's id and the criterion's text, so
the labels stay valid when a predicate changes and measure every version of the judge.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "bench" / "data" / "agreement.yaml"
SKIPPED_KINDS = ("brevity",)  # a word count: a person counts what the predicate counts


class LabelError(ValueError):
    """A label file entry that is not a labelled (answer, criterion) pair this script can measure."""


def load_labels(path: Path = LABELS) -> list[dict]:
    """Every (prompt, policy, answer, criterion, kind, met, why) pair of a label file, checked."""
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list):
        raise LabelError(f"{path}: expected a list of answers")
    pairs = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: answer {number}"
        for field in ("prompt", "batch", "policy", "answer", "labels"):
            if field not in entry:
                raise LabelError(f"{where}: field {field!r} is missing")
        for index, label in enumerate(entry["labels"], start=1):
            if not isinstance(label.get("met"), bool):
                raise LabelError(f"{where}, label {index} ({label.get('criterion')!r}): field 'met' is "
                                 f"{label.get('met')!r}, not true or false")
            if not str(label.get("why") or "").strip():
                raise LabelError(f"{where}, label {index}: field 'why' is empty")
            pairs.append({"prompt": entry["prompt"], "batch": entry["batch"], "policy": entry["policy"],
                          "answer": entry["answer"],
                          "criterion": label["criterion"], "kind": label["kind"], "met": label["met"],
                          "why": label["why"]})
    return pairs


def criteria_of(data: Path) -> dict[tuple[str, str], dict]:
    """(prompt id, criterion text) -> criterion, from a data file in builtin:checkable's format."""
    out = {}
    for line in data.read_text().splitlines():
        row = json.loads(line)
        for c in row["Rubrics"]:
            out[row["extra_info"]["id"], c["criterion"]] = c
    return out


def kappa(human: list[bool], judge: list[bool]) -> float | None:
    """Cohen's kappa of two raters on yes/no labels (None when chance agreement is total)."""
    n = len(human)
    observed = sum(h == j for h, j in zip(human, judge, strict=True)) / n
    p_h, p_j = sum(human) / n, sum(judge) / n
    chance = p_h * p_j + (1 - p_h) * (1 - p_j)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(pairs: list[dict], data: Path) -> dict[str, dict]:
    """Per kind and overall: pairs, accuracy, kappa, and the judge's false positives and negatives."""
    from rgsd_pipeline.rule_judge import check, predicate_of

    criteria = criteria_of(data)
    by_kind = defaultdict(list)
    for pair in pairs:
        key = (pair["prompt"], pair["criterion"])
        if key not in criteria:
            raise LabelError(f"{data} has no criterion {pair['criterion']!r} on prompt {pair['prompt']}")
        met, _ = check(predicate_of(criteria[key]["tags"]), pair["answer"])
        by_kind[pair["kind"]].append((pair["met"], met))
        by_kind["all"].append((pair["met"], met))
    table = {}
    for kind, rows in sorted(by_kind.items(), key=lambda item: (item[0] == "all", item[0])):
        human, judge = [h for h, _ in rows], [j for _, j in rows]
        table[kind] = {"pairs": len(rows), "met_by_hand": sum(human), "met_by_rules": sum(judge),
                       "accuracy": sum(h == j for h, j in rows) / len(rows), "kappa": kappa(human, judge),
                       "false_positives": sum(j and not h for h, j in rows),
                       "false_negatives": sum(h and not j for h, j in rows)}
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = ["| kind | pairs | met by hand | met by rules | accuracy | Cohen's kappa | rules say met, hand not | "
             "hand says met, rules not |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, row in table.items():
        k = "–" if row["kappa"] is None else f"{row['kappa']:.2f}"
        lines.append(f"| {kind} | {row['pairs']} | {row['met_by_hand']} | {row['met_by_rules']} | "
                     f"{row['accuracy']:.2f} | {k} | {row['false_positives']} | {row['false_negatives']} |")
    return "\n".join(lines)


def draw(runs: list[Path], per_policy: int, seed: int) -> str:
    """An unlabelled label file: `per_policy` answers of each evaluated policy of the runs' held-out sets."""
    from rgsd_pipeline import layout
    from rgsd_pipeline.evaluation import HELDOUT
    from rgsd_pipeline.rule_judge import kind_of
    from rgsd_pipeline.shards import read_stage
    from schemas import PROMPTS, ROLLOUTS

    rng = random.Random(seed)
    out = ["# Drawn by bench/agreement.py --draw; labelled by hand (see the header written above this list).", ""]
    for run in runs:
        prompts = {p["prompt_id"]: p for p in read_stage(layout.eval_prompts_dir(run, HELDOUT), PROMPTS)
                   .lazy().collect().iter_rows(named=True)}
        for folder in sorted(p for p in layout.eval_set_dir(run, HELDOUT).iterdir() if (p / "answers").is_dir()):
            answers = read_stage(folder / "answers", ROLLOUTS).lazy().collect().sort("prompt_id", "sample_idx")
            for row in rng.sample(answers.to_dicts(), per_policy):
                prompt = prompts[row["prompt_id"]]
                text = row["response_text"]
                out += [f"- prompt: {prompt['source_id']}", "  batch:", f"  policy: {run.name}/{folder.name}",
                        f"  question: {json.dumps(prompt['messages'][-1]['content'])}",
                        f"  finished: {str(row['finish_reason'] == 'stop').lower()}",
                        f"  answer: {json.dumps(text, ensure_ascii=False)}", "  labels:"]
                for c in prompt["rubric"]:
                    if kind_of(c["tags"]) not in SKIPPED_KINDS:
                        out += [f"    - criterion: {json.dumps(c['criterion'])}", f"      kind: {kind_of(c['tags'])}",
                                "      met:", "      why:"]
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--data", type=Path, default=ROOT / "rgsd_pipeline" / "data" / "checkable.jsonl",
                        help="the data file whose predicates are measured")
    parser.add_argument("--draw", type=Path, nargs="+", metavar="RUN", help="write an unlabelled draw to --labels")
    parser.add_argument("--batch", type=int, help="measure one batch of labels (default: every batch)")
    parser.add_argument("--per-policy", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args()
    if args.draw:
        if args.labels.exists():
            sys.exit(f"{args.labels} exists; it holds labels. Draw to another path (--labels)")
        args.labels.write_text(draw(args.draw, args.per_policy, args.seed))
        print(f"wrote an unlabelled draw to {args.labels}")
        return
    try:
        pairs = [p for p in load_labels(args.labels) if args.batch is None or p["batch"] == args.batch]
        table = agreement(pairs, args.data)
    except LabelError as err:
        sys.exit(str(err))
    print(json.dumps(table, indent=2) if args.json else markdown(table))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
