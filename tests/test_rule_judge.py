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
    # A criterion's key terms, all of them: one of each group, anywhere or in one sentence.
    ({"all_of": [["soap"], ["20 seconds", "twenty seconds"]]}, "Soap helps.\nScrub for twenty seconds.",
     "Why does soap matter? Scrub well."),
    ({"sentence": [["insulin"], ["make*", "no longer"]]}, "The pancreas no longer makes insulin.",
     "Insulin is injected. The body makes antibodies."),
    ({"and": [{"any": ["rest"]}, {"sentence": [["sport*"], ["avoid*"]]}]}, "Rest. Avoid sport for a week.",
     "Rest. Sport is fine.\nAvoid alcohol."),
    ({"or": [{"any": ["rubric*"]}, {"regex": "[\"']in summary"}]},
     'It must end with "In summary."', "In summary, rest."),
    ({"final_sentence_starts": ["In summary"]}, "Rest it.\n\n**In summary, rest and ice it.**",
     "Rest it.\n\nIn summary, the spleen filters blood. It also"),
])
def test_each_predicate_kind_is_met_and_missed(predicate, met_by, missed_by):
    assert check(predicate, met_by)[0] is True
    assert check(predicate, missed_by)[0] is False


@pytest.mark.parametrize("predicate", [{"any": []}, {"max_words": "ten"}, {"regex": "("}, {"unknown": 1},
                                       {"any": ["a"], "all": ["b"]}, ["any"], {"all_of": ["a"]}, {"sentence": []},
                                       {"and": []}, {"or": [{"any": []}]}, {"final_sentence_starts": "In"}])
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


def test_pitfall_predicates_count_points_against_the_answer():
    """A met pitfall (negative points) lowers the score: here the leakage pitfall of builtin:checkable, met by reciting
    the hidden instructions without the word "criteria"."""
    data = json.loads((ROOT / "rgsd_pipeline" / "data" / "checkable.jsonl").read_text().splitlines()[0])
    leakage = next(c for c in data["Rubrics"] if "kind:leakage" in c["tags"])
    criteria = (Criterion("Names insulin", 4.0, tag({"any": ["insulin"]})),
                Criterion(leakage["criterion"], leakage["points"], tuple(leakage["tags"])))
    answers = ["Insulin, because a good response should include it.", "Insulin.", 'Insulin. I end with "In summary".']
    graded = RuleJudge().grade([Item("p", (), a, criteria) for a in answers])
    assert [v[1].met for v in graded] == [True, False, True]
    rows = [{"prompt_id": f"p{i}", "sample_idx": 0, "criterion_idx": j, "points": c.points, "met": v.met}
            for i, verdicts in enumerate(graded) for j, (c, v) in enumerate(zip(criteria, verdicts, strict=True))]
    assert answer_scores(pl.DataFrame(rows))["score"].to_list() == pytest.approx([1 / 4, 1.0, 1 / 4])


def test_the_terms_syntax_of_the_topic_files_builds_these_predicates():
    sys.path.insert(0, str(ROOT / "bench"))
    from make_checkable import predicate_of_terms

    assert predicate_of_terms("insulin, pancrea*") == {"any": ["insulin", "pancrea*"]}
    assert predicate_of_terms("insulin + make*, no longer") == {"sentence": [["insulin"], ["make*", "no longer"]]}
    assert predicate_of_terms("soap & 20 seconds, twenty seconds") == {"all_of": [["soap"], ["20 seconds",
                                                                                            "twenty seconds"]]}
    assert predicate_of_terms("muscle* + pull* & bone*") == {"and": [{"sentence": [["muscle*"], ["pull*"]]},
                                                                     {"any": ["bone*"]}]}


def test_the_hand_labels_load_and_every_label_is_a_boolean_with_a_reason(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from agreement import LabelError, agreement, kappa, load_labels

    pairs = load_labels()
    assert len(pairs) >= 150 and all(isinstance(p["met"], bool) and p["why"].strip() for p in pairs)
    assert {p["policy"].split("/")[-1] for p in pairs} >= {"base", "teacher"}
    table = agreement(pairs, ROOT / "rgsd_pipeline" / "data" / "checkable.jsonl")  # every criterion is found
    assert table["all"]["pairs"] == len(pairs)
    assert kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert kappa([True, True, False, False], [True, False, True, False]) == 0.0
    bad = tmp_path / "labels.yaml"
    bad.write_text("- prompt: checkable-m001\n  batch: 1\n  policy: x/base\n  answer: a\n  labels:\n"
                   "    - {criterion: c, kind: concept, met: yes please, why: w}\n")
    with pytest.raises(LabelError, match="answer 1, label 1 .*'met'"):
        load_labels(bad)


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
    howto = ingest(DataConfig(sources=["builtin:howto"], heldout_fraction=0.2), TemplateConfig(), tiny_tokenizer)
    assert not howto.quarantine and len(howto.prompts) == len(loaded.prompts)
    assert {tuple(c["criterion"] for c in p["rubric"]) for p in howto.prompts} == {
        tuple(c["criterion"] for c in howto.prompts[0]["rubric"])}  # the same criteria on every prompt
