"""Row normalisation of every supported format, and every rule a row can break."""

import math

import pytest

from rgsd_pipeline.rows import RowError, detect_format, heldout, normalize, prompt_id

USER = [{"role": "user", "content": "What lowers blood pressure?"}]
RUBRIC = [{"criterion": "Mentions salt", "points": 5}, {"criterion": "Claims nothing helps", "points": -3}]


def test_rubrichub_row():
    row = normalize({"prompt": USER, "Rubrics": RUBRIC, "domain": "medical"})
    assert row["messages"] == USER
    criteria = [(c["criterion"], c["points"]) for c in row["rubric"]]
    assert criteria == [("Mentions salt", 5.0), ("Claims nothing helps", -3.0)]
    assert row["domain"] == "medical"


def test_rar_row_uses_description_and_weight_and_keeps_title_as_tag():
    row = normalize({"question": "Why is the sky blue?", "reference_answer": "Rayleigh scattering.",
                     "rubric": [{"title": "Rayleigh", "description": "Essential Criteria: names Rayleigh scattering",
                                 "weight": 5}]})
    assert row["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert row["rubric"] == [{"criterion": "Essential Criteria: names Rayleigh scattering", "points": 5.0,
                              "tags": ["title:Rayleigh"]}]
    assert row["reference_answer"] == "Rayleigh scattering."


def test_healthbench_row_keeps_tags_and_defaults_to_medical():
    row = normalize({"prompt_id": "hb-1", "prompt": USER,
                     "rubrics": [{"criterion": "Advises a doctor", "points": 7, "tags": ["axis:completeness"]}]})
    assert row["rubric"][0]["tags"] == ["axis:completeness"]
    assert row["domain"] == "medical" and row["source_id"] == "hb-1"


def test_generic_row_with_string_prompt_and_criteria_key():
    row = normalize({"prompt": "Explain tides.", "criteria": [{"criterion": "Moon gravity", "points": 4}]})
    assert row["messages"][0]["content"] == "Explain tides." and row["rubric"][0]["points"] == 4.0


def test_the_sources_own_id_is_kept():
    assert normalize({"prompt": USER, "Rubrics": RUBRIC, "extra_info": {"id": 17}})["source_id"] == "17"
    rar = {"question": "q", "id": "rar-9", "rubric": [{"description": "d", "weight": 2}]}
    assert normalize(rar)["source_id"] == "rar-9"
    assert normalize({"prompt": USER, "Rubrics": RUBRIC})["source_id"] is None


def test_detect_format():
    assert detect_format({"prompt": USER, "Rubrics": RUBRIC}) == "rubrichub"
    assert detect_format({"question": "q", "rubric": []}) == "rar"
    assert detect_format({"prompt": USER, "rubrics": []}) == "healthbench"
    assert detect_format({"messages": USER, "rubric": []}) == "generic"


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"Rubrics": RUBRIC, "prompt": None}, "prompt", "missing prompt"),
        ({"prompt": [], "Rubrics": RUBRIC}, "prompt", "empty prompt"),
        ({"prompt": [{"role": "user", "content": "   "}], "Rubrics": RUBRIC}, "prompt[0].content", "empty prompt"),
        ({"prompt": [{"role": "bot", "content": "hi"}], "Rubrics": RUBRIC}, "prompt[0].role", "unknown role"),
        ({"prompt": [{"role": "user", "content": 42}], "Rubrics": RUBRIC}, "prompt[0].content", "must be a string"),
        ({"prompt": [*USER, {"role": "assistant", "content": "ok"}], "Rubrics": RUBRIC}, "prompt[1].role",
         "last message must be from the user"),
        ({"prompt": USER, "Rubrics": None}, "Rubrics", "missing rubric"),
        ({"prompt": USER, "Rubrics": []}, "Rubrics", "empty rubric"),
        ({"prompt": USER, "Rubrics": [{"criterion": " ", "points": 1}]}, "Rubrics[0].criterion", "empty criterion"),
        ({"prompt": USER, "Rubrics": [{"criterion": "c", "points": "many"}]}, "Rubrics[0].points", "must be a number"),
        ({"prompt": USER, "Rubrics": [{"criterion": "c", "points": math.nan}]}, "Rubrics[0].points", "finite"),
        ({"prompt": USER, "Rubrics": [{"criterion": "c", "points": math.inf}]}, "Rubrics[0].points", "finite"),
        ({"prompt": USER, "Rubrics": [{"criterion": "c", "points": True}]}, "Rubrics[0].points", "must be a number"),
        ({"prompt": USER, "Rubrics": [{"criterion": "c"}]}, "Rubrics[0].points", "missing points"),
        ({"prompt": USER, "Rubrics": [{"criterion": "a", "points": -1}, {"criterion": "b", "points": -2}]}, "Rubrics",
         "no criterion has positive points"),
        # Never guessed: text points, two spellings of the rubric, fractional or rewarding RaR weights.
        ({"prompt": USER, "Rubrics": [{"criterion": "c", "points": "5"}]}, "Rubrics[0].points",
         "points must be a number, got text '5'"),
        ({"prompt": USER, "Rubrics": RUBRIC, "rubrics": [{"criterion": "other", "points": 1}]}, "Rubrics/rubrics",
         "both 'Rubrics' and 'rubrics' with different content"),
        ({"question": "q", "rubric": [{"description": "d", "weight": 2.5}]}, "rubric[0].weight",
         "RaR weights are whole numbers, got 2.5"),
        ({"question": "q", "rubric": [{"description": "Essential Criteria: x", "weight": 3},
                                      {"description": "Pitfall Criteria: Recommends bleach", "weight": 2}]},
         "rubric[1].weight", "a 'Pitfall Criteria' item needs a negative weight, got 2"),
        ({"prompt": [{"role": "user", "content": "bad \ud800 text"}], "Rubrics": RUBRIC}, "prompt[0].content",
         "invalid Unicode"),
        ({"prompt": USER, "Rubrics": RUBRIC, "domain": {"name": "medical"}}, "domain", "must be a string"),
        ({"prompt": USER, "Rubrics": RUBRIC, "extra_info": {"id": [1]}}, "extra_info.id", "an id must be"),
    ],
)
def test_bad_rows_name_field_and_reason(row, field, reason):
    with pytest.raises(RowError) as err:
        normalize(row)
    assert err.value.field == field
    assert reason in err.value.reason


def test_prompt_id_is_stable_and_content_based():
    a = prompt_id(USER, normalize({"prompt": USER, "Rubrics": RUBRIC})["rubric"])
    assert a == prompt_id([dict(USER[0])], normalize({"prompt": USER, "Rubrics": RUBRIC})["rubric"])
    assert len(a) == 16 and a != prompt_id([{"role": "user", "content": "other"}], [])


def test_heldout_split_matches_fraction_and_is_seeded():
    ids = [f"{i:016x}" for i in range(4000)]
    share = sum(heldout(i, 0.25, seed=0) for i in ids) / len(ids)
    assert abs(share - 0.25) < 0.03
    assert [heldout(i, 0.25, 0) for i in ids] == [heldout(i, 0.25, 0) for i in ids]
    assert [heldout(i, 0.25, 0) for i in ids] != [heldout(i, 0.25, 1) for i in ids]
