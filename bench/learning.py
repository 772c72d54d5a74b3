"""Benchmark: does RGSD raise rubric satisfaction? SmolLM2 on builtin:checkable, graded by the rule judge, on a CPU.

    make proof                                          # = python bench/learning.py (SmolLM2, under an hour)
    python bench/learning.py --quick --out /tmp/proof   # the tiny model, one iteration: what the tests run

Three runs of configs/proof-cpu.yaml on the same prompts and split, each training `--iterations`
iterations of one optimizer step of 16 prompts with the resident `iterate`:

- rubric: the paper's raw-rubric teacher, shown every criterion;
- chosen: the same teacher shown only the criterion kinds it meets more often than the base when it
  answers itself (measured first, before any training: template.only_tags); grading still counts every
  criterion;
- reference: the reference-answer teacher of the paper's ablation (template.teacher=reference; the data
  set's reference answers state the two prompt-specific criteria as key points, so this teacher knows
  the content but not the format the generic criteria ask for).

On the held-out prompts, every policy answers `--samples` times per prompt with the same seeds (paired
samples) and the rule judge grades every criterion: the base model, the teacher itself (the base model
reading the rubric: the ceiling RGSD distils from), the rubric-trained policy every `--eval-every`
iterations, and the reference-trained policy at the end. Reported per policy: rubric satisfaction (points
met over positive points, clipped mean over prompts, 95% bootstrap interval), per domain, the rate of each
criterion kind, held-out teacher-policy JSD, mean answer length and rubric leakage. Writes learning.md (the
table), learning.png (the plot) and the numbers to bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "rgsd_pipeline"]
FIGURES = ROOT / "docs" / "figures"
QUICK = ["model.path=builtin:tiny", "engine.kind=hf", "rollout.max_new_tokens=24", "rollout.prompts_per_iteration=8",
         "train.batch_size=8", "data.rows_per_shard=16"]


def cli(*args) -> str:
    result = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"rgsd-pipeline {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def evaluate(run: Path, policy: str, samples: int, max_prompts: int) -> None:
    from rgsd_pipeline import layout
    from rgsd_pipeline.evaluation import HELDOUT

    if layout.summary_file(run, HELDOUT, policy if not policy.isdigit() else layout.policy_label(int(policy) + 1),
                           "rules").exists():
        return  # evaluated by an earlier (interrupted) run of this benchmark
    cli("evaluate", "--run", run, "--iteration", policy, "--judge", "rules", "--samples", samples,
        "--max-prompts", max_prompts)


def kind_rates(run: Path, label: str) -> dict[str, float]:
    """Per criterion kind, the share of (answer, criterion) pairs where the criterion was met."""
    import polars as pl

    verdicts, _ = verdicts_with_kinds(run, label)
    rates = verdicts.filter(pl.col("met").is_not_null()).group_by("kind").agg(pl.col("met").mean()).sort("kind")
    return dict(rates.iter_rows())


PITFALL_KINDS = ("leakage", "ai_disclaimer")  # the data set's negative-point kinds


def chosen_kinds(base: dict, teacher: dict, margin: float = 0.05) -> list[str]:
    """The criterion kinds the teacher itself does measurably better than the base, decided before any training:
    positive kinds it meets more often, pitfalls (points below zero) it falls into no more often."""
    keys = [k for k in base if k.startswith("kind:")]
    return [k[5:] for k in keys if (teacher.get(k, 0) <= base[k] if k[5:] in PITFALL_KINDS
                                    else teacher.get(k, 0) >= base[k] + margin)]


def iterate(run: Path, iterations: int) -> None:
    from rgsd_pipeline import layout
    from rgsd_pipeline.shards import is_complete

    if not is_complete(layout.checkpoint_dir(run, iterations - 1)):
        cli("iterate", "--run", run, "--iterations", iterations)


@cache
def verdicts_with_kinds(run: Path, label: str):
    """A policy's verdicts on the held-out set, each with its criterion's kind (read once per policy: the table
    and the chosen-kinds score both use them)."""
    import polars as pl

    from rgsd_pipeline import layout
    from rgsd_pipeline.evaluation import HELDOUT
    from rgsd_pipeline.rule_judge import kind_of
    from rgsd_pipeline.shards import read_stage
    from schemas import EVAL_VERDICTS, PROMPTS

    prompts = read_stage(layout.eval_prompts_dir(run, HELDOUT), PROMPTS).lazy().collect()
    kinds = pl.DataFrame([{"prompt_id": p["prompt_id"], "criterion_idx": i, "kind": kind_of(c["tags"]) or "-"}
                          for p in prompts.iter_rows(named=True) for i, c in enumerate(p["rubric"])])
    verdicts = read_stage(layout.verdicts_dir(run, HELDOUT, label, "rules"), EVAL_VERDICTS).lazy().collect()
    return verdicts.join(kinds, on=["prompt_id", "criterion_idx"]), {p["prompt_id"]: p["domain"] for p in
                                                                      prompts.iter_rows(named=True)}


def selected_satisfaction(run: Path, label: str, kinds: list[str]) -> dict:
    """Rubric satisfaction counting only the criteria of the given kinds (interval as for the full score)."""
    import polars as pl

    from rgsd_pipeline.grading import summarize

    verdicts, domains = verdicts_with_kinds(run, label)
    return summarize(verdicts.filter(pl.col("kind").is_in(kinds)), domains)["overall"]


def policy_row(run: Path, label: str, arm: str, iteration: int) -> dict:
    """One row of the table: satisfaction with its interval, per domain and kind, and the diagnostics."""
    from rgsd_pipeline import layout
    from rgsd_pipeline.evaluation import HELDOUT

    summary = json.loads(layout.summary_file(run, HELDOUT, label, "rules").read_text())
    diagnostics = json.loads(layout.diagnostics_file(run, HELDOUT, label).read_text())
    return {"policy": label, "arm": arm, "iteration": iteration, "satisfaction": summary["overall"]["mean"],
            "low": summary["overall"]["low"], "high": summary["overall"]["high"], "prompts": summary["overall"]["n"],
            **{f"domain:{d}": v["mean"] for d, v in summary["domains"].items()},
            **{f"kind:{k}": v for k, v in kind_rates(run, label).items()},
            "heldout_jsd": diagnostics.get("divergence"), "mean_length": diagnostics.get("mean_length"),
            "leakage_rate": diagnostics.get("leakage_rate"), "rubric_word_rate": diagnostics.get("rubric_word_rate")}


def markdown(rows: list[dict], chosen: list[str]) -> str:
    kinds = sorted({k for r in rows for k in r if k.startswith("kind:")})
    domains = sorted({k for r in rows for k in r if k.startswith("domain:")})
    fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    head = ["policy", "teacher", "rubric satisfaction [95% CI]", f"on {'+'.join(chosen) or 'no kind'} [95% CI]",
            *(d[7:] for d in domains), *(k[5:] for k in kinds), "held-out JSD", "length", "leaked 4-grams"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["policy"], r["arm"], f"{fmt(r['satisfaction'])} [{fmt(r['low'])}, {fmt(r['high'])}]",
                 f"{fmt(r['chosen'])} [{fmt(r['chosen_low'])}, {fmt(r['chosen_high'])}]",
                 *(fmt(r.get(d)) for d in domains), *(fmt(r.get(k), ".2f") for k in kinds),
                 fmt(r["heldout_jsd"], ".4f"), fmt(r["mean_length"], ".0f"), fmt(r["leakage_rate"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ARM_STYLE = {"rubric": ("tab:blue", "raw-rubric teacher, every criterion"),
             "chosen": ("tab:green", "raw-rubric teacher, chosen kinds only"),
             "reference": ("tab:orange", "reference-answer teacher")}


def plot(rows: list[dict], path: Path, title: str, chosen: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["policy"] == "base")
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm, (colour, name) in ARM_STYLE.items():
        curve = [base, *sorted((r for r in rows if r["arm"] == arm and r["policy"] not in ("base", "teacher")),
                               key=lambda r: r["iteration"])]
        if len(curve) > 1:
            left.errorbar([r["iteration"] for r in curve], [r["satisfaction"] for r in curve],
                          yerr=[[r["satisfaction"] - r["low"] for r in curve],
                                [r["high"] - r["satisfaction"] for r in curve]],
                          marker="o", capsize=3, color=colour, label=f"RGSD, {name}")
            if chosen and arm == "chosen":
                left.plot([r["iteration"] for r in curve], [r["chosen"] for r in curve], ls=":", marker=".",
                          color=colour, label=f"  the same, scored on {'+'.join(chosen)} only")
        teacher = next((r for r in rows if r["policy"] == "teacher" and r["arm"] == arm), None)
        if teacher:
            left.axhline(teacher["satisfaction"], ls="--", lw=1, color=colour, label=f"teacher itself, {name}")
    left.set_xlabel("iteration (one optimizer step of 16 prompts)")
    left.set_ylabel("held-out rubric satisfaction (all criteria)")
    left.legend(fontsize=7)
    kinds = sorted({k for r in rows for k in r if k.startswith("kind:")})
    finals = {arm: max((r for r in rows if r["arm"] == arm and r["policy"] not in ("base", "teacher")),
                       key=lambda r: r["iteration"], default=None) for arm in ARM_STYLE}
    shown = [("base", base), *((f"after {r['iteration']}, {arm}", r) for arm, r in finals.items() if r),
             *((f"teacher, {r['arm']}", r) for r in rows if r["policy"] == "teacher" and r["arm"] == "rubric")]
    width = 0.8 / len(shown)
    for i, (name, r) in enumerate(shown):
        right.bar([j + i * width for j in range(len(kinds))], [r.get(k, 0) for k in kinds], width, label=name)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], [k[5:] for k in kinds], rotation=30, ha="right")
    right.set_ylabel("share of answers meeting the criterion kind")
    right.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/proof-cpu.yaml")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1, help="answers per held-out prompt and policy")
    parser.add_argument("--max-prompts", type=int, default=0, help="held-out prompts evaluated (0: all)")
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "proof")
    parser.add_argument("--quick", action="store_true", help="the tiny model for one iteration (the tests)")
    args = parser.parse_args()
    overrides = QUICK if args.quick else []
    if args.quick:
        args.iterations, args.eval_every, args.samples, args.max_prompts = 1, 1, 1, args.max_prompts or 6
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    rubric, chosen_run, reference = args.runs / "rubric", args.runs / "chosen", args.runs / "reference"
    for run, teacher in ((rubric, "rubric"), (reference, "reference")):
        if not (run / "run.yaml").exists():
            cli("prepare", "--config", args.config, "--run", run, *overrides, f"template.teacher={teacher}")

    # (a) the base model and (b) the teacher itself, before any training; the kinds the teacher leads on.
    rows = []
    for run, arm, policy in ((rubric, "rubric", "base"), (rubric, "rubric", "teacher"),
                             (reference, "reference", "teacher")):
        evaluate(run, policy, args.samples, args.max_prompts)
        rows.append(policy_row(run, policy, arm, 0))
        print(f"{policy} ({arm}): satisfaction {rows[-1]['satisfaction']:.3f}", flush=True)
    kinds = chosen_kinds(rows[0], rows[1])
    print(f"kinds the teacher itself leads the base on: {', '.join(kinds) or 'none'}", flush=True)
    shown = [f"kind:{k}" for k in kinds if k not in PITFALL_KINDS]
    if not (chosen_run / "run.yaml").exists():
        cli("prepare", "--config", args.config, "--run", chosen_run, *overrides,
            f"template.only_tags={json.dumps(shown)}")
    evaluate(chosen_run, "teacher", args.samples, args.max_prompts)
    rows.insert(2, policy_row(chosen_run, "teacher", "chosen", 0))

    # (c) the rubric and chosen-kinds runs at the paper's cadence, evaluated every --eval-every iterations.
    for run, arm in ((rubric, "rubric"), (chosen_run, "chosen")):
        for stop in range(args.eval_every, args.iterations + 1, args.eval_every):
            iterate(run, stop)
            evaluate(run, str(stop - 1), args.samples, args.max_prompts)
            rows.append(policy_row(run, f"iter-{stop - 1:03d}", arm, stop))
            print(f"{arm} iteration {stop}: satisfaction {rows[-1]['satisfaction']:.3f}", flush=True)
    # The ablation: the reference-answer teacher on the same budget.
    iterate(reference, args.iterations)
    evaluate(reference, str(args.iterations - 1), args.samples, args.max_prompts)
    rows.append(policy_row(reference, f"iter-{args.iterations - 1:03d}", "reference", args.iterations))

    runs = {"rubric": rubric, "chosen": chosen_run, "reference": reference}
    for row in rows:
        chosen = selected_satisfaction(runs[row["arm"]], row["policy"], kinds) if kinds else {}
        row.update({"chosen": chosen.get("mean"), "chosen_low": chosen.get("low"), "chosen_high": chosen.get("high")})
    minutes = (time.perf_counter() - started) / 60
    table = markdown(rows, kinds)
    (args.out / "learning.md").write_text(table)
    title = f"RGSD on builtin:checkable, held-out, rule judge ({minutes:.0f} min on this CPU)"
    plot(rows, args.out / "learning.png", title, kinds)
    print(table)
    print(f"{minutes:.1f} minutes; table {args.out / 'learning.md'}, plot {args.out / 'learning.png'}")
    if not args.quick:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import record

        record("learning / SmolLM2 on builtin:checkable", {
            "minutes": minutes, **{f"{r['policy']} ({r['arm']}): satisfaction": r["satisfaction"] for r in rows},
            **{f"{r['policy']} ({r['arm']}): interval": f"[{r['low']:.3f}, {r['high']:.3f}]" for r in rows},
            **{f"{r['policy']} ({r['arm']}): on chosen kinds": r["chosen"] for r in rows}, "chosen kinds": kinds})


if __name__ == "__main__":
    main()
