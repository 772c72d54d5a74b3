"""The rule judge against hand-made answers, and the checkable data set it grades."""

import json
import subprocess
import sys

import polars as pl
import pytest
from helpers import ROOT

from rgsd_pipeline.config import DataConfig, TemplateConfig
from rgsd_pipeline.grading import answer_scores
from rgsd_pipeline.ingest import ingest
from rgsd_pipeline.judge import Criterion, Item
from rgsd_pipeline.render import teacher_messages
from rgsd_pipeline.rule_judge import PredicateError, RuleJudge, check


def tag(predicate):
    return (f"check:{json.dumps(predicate)}",)


@pytest.mark.parametrize("predicate, met_by, missed_by", [
    ({"any": ["insulin", "pancrea*"]}, "Your pancreas stops making it.", "Sugar builds up."),
    ({"any": ["GP"]}, "See your GP.", "Grapes are fine."),  # whole words only
    ({"all": ["systolic", "diastolic"]}, "Systolic over diastolic.", "Only systolic matters."),
    ({"max_words": 5}, "One two three four five.", "One two three four five six."),
    ({"min_words": 3}, "one two three", "one two"),
    ({"numbered_list": 2}, "Steps:\n1. Rest\n2) Ice", "1. Rest, then ice."),
    ({"last_line_starts": ["In summary"]}, "Rest it.\n\n**In summary**, rest and ice it.",
     "In summary, rest.\nThen ice."),
    ({"number_with_unit": ["m/s", "km/h"]}, "It falls at 9.8 m/s after one second.", "It falls fast, in m/s."),
    ({"regex": r"\bI'?m not a doctor\b"}, "I’m not a doctor, but...", "A doctor can help."),
    ({"not": {"any": ["rubric"]}}, "Here is my answer.", "As the rubric asks..."),
])
def test_each_predicate_kind_is_met_and_missed(predicate, met_by, missed_by):
    assert check(predicate, met_by)[0] is True
    assert check(predicate, missed_by)[0] is False


@pytest.mark.parametrize("predicate", [{"any": []}, {"max_words": "ten"}, {"regex": "("}, {"unknown": 1},
                                       {"any": ["a"], "all": ["b"]}, ["any"]])
def test_malformed_predicates_are_refused(predicate):
    with pytest.raises(PredicateError):
        check(predicate, "answer")


def test_verdicts_and_scores_with_pitfalls_empty_answers_and_unjudgeable_criteria():
    criteria = (Criterion("Names insulin", 4.0, tag({"any": ["insulin"]})),
                Criterion("Advises a doctor", 2.0, tag({"any": ["doctor"]})),
                Criterion("Mentions the rubric", -3.0, tag({"any": ["rubric"]})),
                Criterion("Explains it kindly", 1.0, ("axis:tone",)),  # no predicate: no verdict
                Criterion("Broken", 1.0, ("check:{not json",)))
    answers = ["Insulin is made by the pancreas; as the rubric says, see a doctor.", "", "Ask your doctor."]
    judge = RuleJudge()
    graded = judge.grade([Item(f"p{i}", (), a, criteria) for i, a in enumerate(answers)])
    assert [[v.met for v in verdicts] for verdicts in graded] == [[True, True, True, None, None],
                                                                  [False, False, False, None, None],
                                                                  [False, True, False, None, None]]
    assert (judge.stats.judged, judge.stats.unjudgeable, judge.stats.unparseable) == (9, 3, 3)
    assert "unparseable predicate" in graded[0][4].explanation
    rows = [{"prompt_id": f"p{i}", "sample_idx": 0, "criterion_idx": j, "points": c.points, "met": v.met}
            for i, verdicts in enumerate(graded) for j, (c, v) in enumerate(zip(criteria, verdicts, strict=True))]
    scores = answer_scores(pl.DataFrame(rows))["score"].to_list()
    assert scores == pytest.approx([(4 + 2 - 3) / 6, 0.0, 2 / 6])  # a met pitfall subtracts; no verdict, no points


def test_the_checkable_data_set_is_what_its_builder_builds_and_loads_clean(tiny_tokenizer):
    result = subprocess.run([sys.executable, "bench/make_checkable.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    loaded = ingest(DataConfig(sources=["builtin:checkable"], heldout_fraction=0.2), TemplateConfig(pitfalls="avoid"),
                    tiny_tokenizer)
    assert not loaded.quarantine and len(loaded.prompts) >= 200
    assert {p["domain"] for p in loaded.prompts} == {"medical", "science"}
    judge = RuleJudge()
    for prompt in loaded.prompts:
        assert all(any(t.startswith("check:") for t in c["tags"]) for c in prompt["rubric"])
        assert any(c["points"] < 0 for c in prompt["rubric"]) and any(c["points"] > 0 for c in prompt["rubric"])
        # The predicates are never shown: the teacher reads the criteria's text only.
        teacher = json.dumps(teacher_messages(prompt, TemplateConfig(pitfalls="avoid")))
        assert "check:" not in teacher and '"any"' not in teacher
        item = Item(prompt["prompt_id"], (), "", tuple(Criterion(c["criterion"], c["points"], tuple(c["tags"]))
                                                      for c in prompt["rubric"]))
        assert all(v.met is not None for v in judge.grade([item])[0])
    kinds = {t for p in loaded.prompts for c in p["rubric"] for t in c["tags"] if t.startswith("kind:")}
    held = {t for p in loaded.prompts if p["split"] == "heldout" for c in p["rubric"] for t in c["tags"]
            if t.startswith("kind:")}
    assert held == kinds  # held-out prompts share the criterion kinds, not the prompts
