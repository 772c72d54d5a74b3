"""Benchmark: does RGSD raise rubric satisfaction? SmolLM2 on builtin:checkable or builtin:howto, graded by the rule
judge, on a CPU.

    make proof                                          # = python bench/learning.py (every arm, SmolLM2)
    python bench/learning.py --arms rubric,placebo,grpo --iterations 4 --eval-every 4   # some arms, fewer steps
    python bench/learning.py --data builtin:howto --arms rubric,g1,hybrid   # the demo's recipe and data
    python bench/learning.py --quick --out /tmp/proof   # the tiny model, one iteration: what the tests run

Runs of one recipe on the same prompts and split ("arms"): on builtin:checkable configs/proof-cpu.yaml, each
training `--iterations` iterations of one optimizer step of 16 prompts with the resident `iterate`; on
builtin:howto the demo's configs/smollm2-cpu.yaml (one iteration of 8 steps of 8 prompts) with a quarter of the
questions held out, the same questions builtin:checkable holds out (the split is drawn per question). Every arm
makes the same number of optimizer steps:

- rubric: the paper's raw-rubric teacher, shown every criterion;
- chosen: the same teacher shown only the criterion kinds it meets more often than the base when it
  answers itself (measured first, before any training: template.only_tags); grading counts every criterion;
- reference: the reference-answer teacher of the paper's ablation (template.teacher=reference);
- placebo: the control for noise: the teacher reads exactly what the student reads (template.teacher=student),
  signals stored as float32 (uint8 codes would leave a gradient an identity teacher does not have);
- lr: the raw-rubric teacher at 3e-6, the paper's 1e-6 scaled for a 135M model's larger gradients' noise;
- grpo: the paper's baseline, GRPO with the rule judge as reward, 4 rollouts per prompt and each optimizer step
  over 4 times the RGSD arms' batch (the same number of steps and prompts per step as the RGSD arms);
- g0.5, g1, g2: the raw-rubric teacher with rubric guidance at that scale against the plain negative
  (score.guidance, rgsd_pipeline/guidance.py); g1-other: guidance 1 against another prompt's rubric;
- hybrid: jsd+grpo, the raw-rubric teacher's divergence plus 0.1 times GRPO's term on the same 4 rollouts per
  prompt (train.reward_weight; the batch as grpo's).

On the held-out prompts, every policy answers `--samples` times per prompt with the same seeds (paired
samples) and the rule judge grades every criterion: the base model, the teacher itself (the base model
reading what each arm's teacher reads, a guided teacher sampled from its guided distribution: the ceiling
RGSD distils from), the rubric arm every `--eval-every` iterations and the other arms at the end. Reported per
policy: rubric satisfaction (points met over positive points, clipped mean over prompts, 95% bootstrap
interval), the paired difference against the base model and against the raw-rubric arm (the same prompts and
seeds, bootstrap over prompts), per domain, the rate of each criterion kind, the satisfaction of the same answers
on the other data set's criteria for the same questions (`evaluate --also-grade`: format for checkable, content
for howto), held-out teacher-policy JSD, mean answer length, rubric leakage, and what the arm cost in training:
rollouts sampled and judge calls (criteria graded). A finished arm is reused: rerun with `--arms` to add
one. Writes learning.md (the table), learning.png (the plot) and the numbers to bench/results.json.
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
# Arm -> (what it is, its overrides of the recipe). The chosen arm's overrides are decided after the base and the
# teacher are measured. The arms that sample 4 rollouts per prompt ("GROUPED") take 4 times the recipe's batch, so
# that every arm makes the same optimizer steps over the same prompts.
ARMS = {
    "rubric": ("raw-rubric teacher, every criterion", []),
    "chosen": ("raw-rubric teacher, chosen kinds only", None),
    "reference": ("reference-answer teacher", ["template.teacher=reference"]),
    "placebo": ("placebo: teacher reads the student's view, float32 signals",
                ["template.teacher=student", "score.value_dtype=float32"]),
    "lr": ("raw-rubric teacher, lr 3e-6", ["train.learning_rate=3e-6"]),
    "grpo": ("GRPO, rule-judge reward, 4 rollouts per prompt", ["train.loss=grpo"]),
    "g0.5": ("raw rubric, guidance 0.5 (plain negative)", ["score.guidance=0.5"]),
    "g1": ("raw rubric, guidance 1 (plain negative)", ["score.guidance=1.0"]),
    "g2": ("raw rubric, guidance 2 (plain negative)", ["score.guidance=2.0"]),
    "g1-other": ("raw rubric, guidance 1 (other-rubric negative)",
                 ["score.guidance=1.0", "score.guidance_negative=other_rubric"]),
    "hybrid": ("jsd+grpo: raw-rubric JSD + 0.1 x GRPO, 4 rollouts per prompt",
               ["train.loss=jsd+grpo", "train.reward_weight=0.1"]),
}
GROUPED = ("grpo", "hybrid")
# The teacher each arm distils from, when it is not the raw-rubric one: its own teacher row.
OWN_TEACHER = ("chosen", "reference", "g0.5", "g1", "g2", "g1-other")
DATASETS = {"builtin:checkable": ("configs/proof-cpu.yaml", [], 12),
            "builtin:howto": ("configs/smollm2-cpu.yaml", ["data.heldout_fraction=0.25"], 1)}
OTHER = {"builtin:checkable": "builtin:howto", "builtin:howto": "builtin:checkable"}


def grouped(config_path: str, overrides: list[str]) -> list[str]:
    """4 rollouts per prompt and 4 times the recipe's batch (the same optimizer steps and prompts per step)."""
    from rgsd_pipeline.config import load_config

    batch = load_config(ROOT / config_path, overrides).train.batch_size
    return ["rollout.samples_per_prompt=4", f"train.batch_size={4 * batch}", "train.micro_batch_size=8"]


def cli(*args) -> str:
    result = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"rgsd-pipeline {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def evaluate(run: Path, policy: str, samples: int, max_prompts: int, also: str) -> None:
    """A policy's held-out answers graded by the rules, and against `also`'s criteria for the same questions."""
    from rgsd_pipeline import layout
    from rgsd_pipeline.evaluation import HELDOUT, set_name_for

    label = policy if not policy.isdigit() else layout.policy_label(int(policy) + 1)
    if all(layout.summary_file(run, HELDOUT, label, judge).exists() for judge in ("rules",
                                                                                 f"rules-{set_name_for(also)}")):
        return  # evaluated by an earlier (interrupted) run of this benchmark
    cli("evaluate", "--run", run, "--iteration", policy, "--judge", "rules", "--samples", samples,
        "--max-prompts", max_prompts, "--also-grade", also)


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


def policy_row(run: Path, label: str, arm: str, iteration: int, also: str) -> dict:
    """One row of the table: satisfaction with its interval, per domain and kind, on `also`'s criteria, and the
    diagnostics."""
    from rgsd_pipeline import layout
    from rgsd_pipeline.evaluation import HELDOUT, set_name_for

    summary = json.loads(layout.summary_file(run, HELDOUT, label, "rules").read_text())
    other = json.loads(layout.summary_file(run, HELDOUT, label, f"rules-{set_name_for(also)}").read_text())["overall"]
    diagnostics = json.loads(layout.diagnostics_file(run, HELDOUT, label).read_text())
    return {"policy": label, "arm": arm, "iteration": iteration, "satisfaction": summary["overall"]["mean"],
            "low": summary["overall"]["low"], "high": summary["overall"]["high"], "prompts": summary["overall"]["n"],
            "finished": summary["finished"]["mean"], "finished_answers": summary["finished"]["answers"],
            "also": other["mean"], "also_low": other["low"], "also_high": other["high"],
            **{f"domain:{d}": v["mean"] for d, v in summary["domains"].items()},
            **{f"kind:{k}": v for k, v in kind_rates(run, label).items()},
            "heldout_jsd": diagnostics.get("divergence"), "mean_length": diagnostics.get("mean_length"),
            "leakage_rate": diagnostics.get("leakage_rate"), "rubric_word_rate": diagnostics.get("rubric_word_rate")}


def paired(run: Path, label: str, against_run: Path, against: str) -> dict:
    """The paired difference of two policies' satisfaction on the same held-out prompts and seeds (rules)."""
    from rgsd_pipeline.grading import paired_difference

    return paired_difference(verdicts_with_kinds(run, label)[0], verdicts_with_kinds(against_run, against)[0])


def markdown(rows: list[dict], chosen: list[str], also: str) -> str:
    kinds = sorted({k for r in rows for k in r if k.startswith("kind:")})
    domains = sorted({k for r in rows for k in r if k.startswith("domain:")})
    fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    signed = lambda d: "–" if not d or d.get("mean") is None else (  # noqa: E731
        f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    head = ["policy", "teacher", "rubric satisfaction [95% CI]", "− base, paired [95% CI]",
            "− raw-rubric arm, paired [95% CI]", f"on {also}'s criteria [95% CI]", "on finished answers (n)",
            f"on {'+'.join(chosen) or 'no kind'} [95% CI]",
            *(d[7:] for d in domains), *(k[5:] for k in kinds), "held-out JSD", "length", "leaked 4-grams",
            "rollouts", "judge calls"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["policy"], r["arm"], f"{fmt(r['satisfaction'])} [{fmt(r['low'])}, {fmt(r['high'])}]",
                 signed(r.get("vs_base")), signed(r.get("vs_rubric")),
                 f"{fmt(r['also'])} [{fmt(r['also_low'])}, {fmt(r['also_high'])}]",
                 f"{fmt(r['finished'])} ({r['finished_answers']})",
                 f"{fmt(r['chosen'])} [{fmt(r['chosen_low'])}, {fmt(r['chosen_high'])}]",
                 *(fmt(r.get(d)) for d in domains), *(fmt(r.get(k), ".2f") for k in kinds),
                 fmt(r["heldout_jsd"], ".4f"), fmt(r["mean_length"], ".0f"), fmt(r["leakage_rate"], ".2f"),
                 fmt(r.get("rollouts"), ",d"), fmt(r.get("judge_calls"), ",d")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ARM_STYLE = {"rubric": "tab:blue", "chosen": "tab:green", "reference": "tab:orange", "placebo": "tab:gray",
             "lr": "tab:purple", "grpo": "tab:red", "g0.5": "tab:olive", "g1": "tab:cyan", "g2": "tab:pink",
             "g1-other": "tab:brown", "hybrid": "black"}


def plot(rows: list[dict], path: Path, title: str, chosen: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["policy"] == "base")
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm, colour in ARM_STYLE.items():
        name = ARMS[arm][0]
        curve = [base, *sorted((r for r in rows if r["arm"] == arm and r["policy"] not in ("base", "teacher")),
                               key=lambda r: r["iteration"])]
        if len(curve) > 1:
            left.errorbar([r["iteration"] for r in curve], [r["satisfaction"] for r in curve],
                          yerr=[[r["satisfaction"] - r["low"] for r in curve],
                                [r["high"] - r["satisfaction"] for r in curve]],
                          marker="o", capsize=3, color=colour, label=name if arm in GROUPED else f"RGSD, {name}")
            if chosen and arm == "chosen":
                left.plot([r["iteration"] for r in curve], [r["chosen"] for r in curve], ls=":", marker=".",
                          color=colour, label=f"  the same, scored on {'+'.join(chosen)} only")
        teacher = next((r for r in rows if r["policy"] == "teacher" and r["arm"] == arm), None)
        if teacher:
            left.axhline(teacher["satisfaction"], ls="--", lw=1, color=colour, label=f"teacher itself, {name}")
    left.set_xlabel("iteration (checkable: one optimizer step of 16 prompts; howto: 8 steps of 8)")
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


def training_cost(run: Path, iterations: int) -> tuple[int, int]:
    """(rollouts sampled, judge calls made) over an arm's first `iterations` iterations: a judge call is one graded
    criterion of one rollout (the reward stage of grpo; RGSD calls no judge in training)."""
    import polars as pl

    from rgsd_pipeline import layout
    from rgsd_pipeline.shards import is_complete, read_stage
    from schemas import REWARDS, ROLLOUTS

    rollouts = calls = 0
    for i in range(iterations):
        rollouts += read_stage(layout.rollouts_dir(run, i), ROLLOUTS, verify=False).rows
        if is_complete(layout.rewards_dir(run, i)):
            rewards = read_stage(layout.rewards_dir(run, i), REWARDS, verify=False).lazy()
            calls += int(rewards.select(pl.col("verdicts").list.len().sum()).collect().item())
    return rollouts, calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="builtin:checkable", choices=list(DATASETS),
                        help="the data every arm trains on (its recipe: configs/proof-cpu.yaml for checkable, the "
                             "demo's configs/smollm2-cpu.yaml for howto)")
    parser.add_argument("--config", help="another recipe than the data set's")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--iterations", type=int, help="iterations per arm (default: 12 on checkable, 1 on howto)")
    parser.add_argument("--eval-every", type=int, default=4, help="evaluate the rubric arm every N iterations")
    parser.add_argument("--samples", type=int, default=1, help="answers per held-out prompt and policy")
    parser.add_argument("--max-prompts", type=int, default=0, help="held-out prompts evaluated (0: all)")
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "proof")
    parser.add_argument("--quick", action="store_true", help="the tiny model for one iteration (the tests)")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    recipe, recipe_overrides, default_iterations = DATASETS[args.data]
    config_path = args.config or recipe
    overrides = [f"data.sources=[{args.data}]", *recipe_overrides, *(QUICK if args.quick else [])]
    args.iterations = args.iterations or default_iterations
    also = OTHER[args.data]
    if args.quick:
        args.iterations, args.eval_every, args.samples, args.max_prompts = 1, 1, 1, args.max_prompts or 6
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {arm: args.runs / arm for arm in ARMS}
    # The chosen arm is decided from the raw-rubric teacher's own answers, so it needs the rubric run prepared; the
    # base model is evaluated once, on that run or the first arm's (every arm has the same prompts and split).
    measured = (["rubric"] if "chosen" in arms and "rubric" not in arms else []) + arms
    anchor = runs["rubric"] if "rubric" in measured else runs[arms[0]]

    def prepare(arm: str, extra: list[str]) -> None:
        if not (runs[arm] / "run.yaml").exists():
            group = grouped(config_path, overrides) if arm in GROUPED else []
            cli("prepare", "--config", config_path, "--run", runs[arm], *overrides, *extra, *group)

    # (a) the base model and (b) the teacher of each arm whose teacher reads something, before any training.
    for arm in measured:
        if arm != "chosen":
            prepare(arm, ARMS[arm][1])
    evaluate(anchor, "base", args.samples, args.max_prompts, also)
    rows = [policy_row(anchor, "base", "rubric" if anchor == runs["rubric"] else arms[0], 0, also)]
    print(f"base: satisfaction {rows[-1]['satisfaction']:.3f}", flush=True)
    kinds = []
    if "rubric" in measured:
        evaluate(runs["rubric"], "teacher", args.samples, args.max_prompts, also)
        rows.append(policy_row(runs["rubric"], "teacher", "rubric", 0, also))
        kinds = chosen_kinds(rows[0], rows[-1])
        print(f"kinds the teacher itself leads the base on: {', '.join(kinds) or 'none'}", flush=True)
        if "rubric" not in arms:
            rows.pop()
    if "chosen" in arms:
        prepare("chosen", [f"template.only_tags={json.dumps([f'kind:{k}' for k in kinds if k not in PITFALL_KINDS])}"])
    for arm in OWN_TEACHER:
        if arm in arms:
            evaluate(runs[arm], "teacher", args.samples, args.max_prompts, also)
            rows.append(policy_row(runs[arm], "teacher", arm, 0, also))
            print(f"teacher itself, {arm}: satisfaction {rows[-1]['satisfaction']:.3f}", flush=True)

    # (c) every arm at the same optimizer steps; the rubric arm evaluated every --eval-every iterations, the rest at
    #     the end.
    for arm in arms:
        stops = range(args.eval_every, args.iterations + 1, args.eval_every) if arm == "rubric" else [args.iterations]
        for stop in stops or [args.iterations]:
            iterate(runs[arm], stop)
            evaluate(runs[arm], str(stop - 1), args.samples, args.max_prompts, also)
            row = policy_row(runs[arm], f"iter-{stop - 1:03d}", arm, stop, also)
            row["rollouts"], row["judge_calls"] = training_cost(runs[arm], stop)
            rows.append(row)
            print(f"{arm} iteration {stop}: satisfaction {row['satisfaction']:.3f}", flush=True)

    # (d) paired differences: every trained policy against the base and against the raw-rubric arm at its steps.
    final_rubric = next((r for r in rows if r["arm"] == "rubric" and r["iteration"] == args.iterations
                         and r["policy"] != "teacher"), None)
    for row in rows:
        run = anchor if row["policy"] == "base" else runs[row["arm"]]
        chosen = selected_satisfaction(run, row["policy"], kinds) if kinds else {}
        row.update({"chosen": chosen.get("mean"), "chosen_low": chosen.get("low"), "chosen_high": chosen.get("high")})
        if row["policy"] != "base":
            row["vs_base"] = paired(run, row["policy"], anchor, "base")
        if final_rubric is not None and row["arm"] != "rubric" and row["policy"] not in ("base", "teacher"):
            row["vs_rubric"] = paired(run, row["policy"], runs["rubric"], final_rubric["policy"])
    minutes = (time.perf_counter() - started) / 60
    table = markdown(rows, kinds, also)
    (args.out / "learning.md").write_text(table)
    title = f"RGSD on {args.data}, held-out, rule judge ({minutes:.0f} min on this CPU)"
    plot(rows, args.out / "learning.png", title, kinds)
    print(table)
    print(f"{minutes:.1f} minutes; table {args.out / 'learning.md'}, plot {args.out / 'learning.png'}")
    if not args.quick:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import record

        interval = lambda d: f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"  # noqa: E731
        record(f"learning / SmolLM2 on {args.data}, arms {'+'.join(arms)}, {args.iterations} iteration(s)", {
            "minutes": minutes, **{f"{r['policy']} ({r['arm']}): satisfaction": r["satisfaction"] for r in rows},
            **{f"{r['policy']} ({r['arm']}): interval": f"[{r['low']:.3f}, {r['high']:.3f}]" for r in rows},
            **{f"{r['policy']} ({r['arm']}): - base, paired": interval(r["vs_base"]) for r in rows if r.get("vs_base")},
            **{f"{r['policy']} ({r['arm']}): - raw-rubric arm, paired": interval(r["vs_rubric"]) for r in rows
               if r.get("vs_rubric")},
            **{f"{r['policy']} ({r['arm']}): on {also}'s criteria": r["also"] for r in rows},
            **{f"{r['policy']} ({r['arm']}): rollouts, judge calls": f"{r.get('rollouts')}, {r.get('judge_calls')}"
               for r in rows if "rollouts" in r},
            "chosen kinds": kinds})


if __name__ == "__main__":
    main()
