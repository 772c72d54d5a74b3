"""The judge client (against a scripted OpenAI-compatible server), reply parsing, and the scoring arithmetic."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import polars as pl
import pytest

from rgsd_pipeline.diagnostics import repetition_rate, rubric_leakage
from rgsd_pipeline.grading import answer_scores, clipped_mean, interval, paired_difference, summarize
from rgsd_pipeline.judge import Criterion, Item, Judge, JudgeError, JudgeSettings, VerdictCache, parse_reply

# ---------------------------------------------------------------- reply parsing


@pytest.mark.parametrize("text, expected", [
    ('{"explanation": "ok", "met": true}', [True]),
    ('```json\n{"explanation": "no", "met": false}\n```', [False]),
    ('Sure! {"met": "true", "explanation": "x"} hope that helps', [True]),
    ('{"criteria_met": false}', [False]),
    ('{"explanation": "raw\ttab and \x01 control", "met": true}', [True]),
    ('{"explanation": "x"}', None),
    ('{"met": "maybe"}', None),
    ("I think it does.", None),
    ("", None),
])
def test_parse_one_verdict(text, expected):
    verdicts = parse_reply(text, None)
    assert (None if verdicts is None else [v.met for v in verdicts]) == expected


def test_parse_all_verdicts_needs_one_per_criterion_in_order():
    two = '{"verdicts": [{"explanation": "a", "met": true}, {"explanation": "b", "met": false}]}'
    assert [v.met for v in parse_reply(two, 2)] == [True, False]
    assert parse_reply(two, 3) is None
    assert parse_reply('{"verdicts": [{"met": true}, {"met": 1}]}', 2) is None


# ---------------------------------------------------------------- scoring arithmetic (hand-computed)


def verdict_rows(spec):
    rows = []
    for prompt_id, criteria in spec.items():
        for i, (points, met) in enumerate(criteria):
            rows.append({"prompt_id": prompt_id, "sample_idx": 0, "criterion_idx": i, "points": float(points),
                         "met": met})
    return pl.DataFrame(rows, schema={"prompt_id": pl.String, "sample_idx": pl.Int32, "criterion_idx": pl.Int32,
                                      "points": pl.Float32, "met": pl.Boolean})


SPEC = {
    "A": [(5, True), (3, False), (-2, True)],  # (5 - 2) / 8 = 0.375: a met pitfall subtracts
    "B": [(4, False), (2, False)],  # all unmet: 0
    "C": [(2, True), (1, None), (-1, False)],  # the unparseable criterion leaves both sums: 2 / 2 = 1
    "D": [(3, None)],  # nothing parsed: no score
    "E": [(2, True), (-1, True), (2, False)],  # (2 - 1) / 4 = 0.25
}
DOMAINS = {"A": "medical", "B": "medical", "C": "science", "D": "science", "E": "science"}


def test_answer_scores_by_hand():
    scores = {r["prompt_id"]: r for r in answer_scores(verdict_rows(SPEC)).iter_rows(named=True)}
    assert scores["A"]["score"] == pytest.approx(0.375)
    assert scores["B"]["score"] == 0.0
    assert scores["C"]["score"] == 1.0 and scores["C"]["unparseable"] == 1
    assert scores["D"]["score"] is None
    assert scores["E"]["score"] == pytest.approx(0.25)


def test_summary_by_hand():
    summary = summarize(verdict_rows(SPEC), DOMAINS, resamples=200)
    assert summary["overall"]["mean"] == pytest.approx((0.375 + 0 + 1 + 0.25) / 4)
    assert summary["overall"]["n"] == 4
    assert summary["domains"]["medical"]["mean"] == pytest.approx(0.1875)
    assert summary["domains"]["science"]["mean"] == pytest.approx(0.625)
    assert summary["unparseable"] == 2 and summary["answers_without_score"] == 1 and summary["criteria"] == 12
    low, high = summary["overall"]["low"], summary["overall"]["high"]
    assert 0.0 <= low <= summary["overall"]["mean"] <= high <= 1.0


def test_mean_is_clipped_and_intervals_behave():
    assert clipped_mean(np.array([-2.0, 0.5])) == 0.0
    assert clipped_mean(np.array([1.0, 1.5])) == 1.0
    constant = interval(np.full(30, 0.4))
    assert constant["low"] == constant["high"] == pytest.approx(0.4)
    spread = interval(np.array([0.0, 1.0] * 50), seed=3)
    assert spread["low"] < 0.5 < spread["high"] and spread == interval(np.array([0.0, 1.0] * 50), seed=3)
    assert interval(np.array([]))["mean"] is None


def test_paired_difference_is_the_difference_of_the_rows_clipped_means():
    """Met pitfalls make per-prompt scores negative; the rows clip the mean over prompts to [0, 1], so the paired
    difference must be the difference of those clipped means, not the mean of the unclipped differences."""
    before = {p: [(1, False), (-3, True)] for p in "PQR"}  # -3 each: the row shows clip(-3) = 0
    after = {"P": [(1, True), (-3, False)], "Q": [(1, False), (-3, False)], "R": [(1, False), (-3, False)]}  # 1/3
    rows = [summarize(verdict_rows(spec), {}, resamples=200)["overall"]["mean"] for spec in (after, before)]
    assert rows == pytest.approx([1 / 3, 0.0])
    difference = paired_difference(verdict_rows(after), verdict_rows(before), resamples=500)
    assert difference["mean"] == pytest.approx(rows[0] - rows[1])  # the unclipped mean difference would be 3.33
    assert difference["n"] == 3 and 0.0 <= difference["low"] <= difference["mean"] <= difference["high"] <= 1.0


# ---------------------------------------------------------------- judge-free diagnostics


def test_repetition_rate():
    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition_rate([7] * 10) == pytest.approx(1 - 1 / 7)
    assert repetition_rate([1, 2]) == 0.0


def test_rubric_leakage():
    criteria = ["Recommends checking blood glucose levels before exercise", "Mentions hydration"]
    prompt = "How should a diabetic prepare before exercise?"
    leaked = rubric_leakage("You should check blood glucose levels before exercise.", prompt, criteria)
    assert leaked["leaked_ngrams"] == ["blood glucose levels before", "glucose levels before exercise"]
    clean = rubric_leakage("Eat something and drink water.", prompt, criteria)
    assert clean == {"leaked_ngrams": [], "rubric_words": []}
    # n-grams the prompt itself contains are not leakage; naming the rubric is.
    assert rubric_leakage("As the rubric criteria say, prepare before exercise.", "prepare before exercise today",
                          ["prepare before exercise today"])["rubric_words"] == ["criteria", "rubric"]


# ---------------------------------------------------------------- the client against a scripted server


class ScriptedJudge(BaseHTTPRequestHandler):
    """met = the criterion contains MET; GARBAGE gets prose; FLAKY gets a 503 the first time; json_schema is refused."""

    calls: list = []
    flaky_seen: set = set()

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        model = {"id": "scripted", "object": "model", "created": 0, "owned_by": "t"}
        self.reply(200, {"object": "list", "data": [model]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if "response_format" in body:
            return self.reply(400, {"error": {"message": "response_format json_schema is not supported here",
                                              "type": "invalid_request_error"}})
        prompt = body["messages"][-1]["content"]
        if "<criteria>" in prompt:
            listed = re.findall(r"^\d+\. \(.*?\) (.*)$", prompt.split("<criteria>")[1], re.M)
            content = json.dumps({"verdicts": [{"explanation": "", "met": "MET" in c} for c in listed]})
        else:
            criterion = prompt.split("<criterion")[1]
            if "FLAKY" in criterion and prompt not in type(self).flaky_seen:
                type(self).flaky_seen.add(prompt)
                return self.reply(503, {"error": {"message": "busy"}}, [("retry-after-ms", "5")])
            verdict = json.dumps({"explanation": "e", "met": "MET" in criterion})
            content = "Probably yes." if "GARBAGE" in criterion else verdict
        type(self).calls.append(prompt)  # answered requests only
        self.reply(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "scripted",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def scripted_server():
    ScriptedJudge.calls, ScriptedJudge.flaky_seen = [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def items():
    rubric = (Criterion("Says MET things", 5.0), Criterion("GARBAGE criterion", 3.0),
              Criterion("FLAKY but MET", 2.0), Criterion("Avoids harm", -4.0))
    return [Item(f"p{i}", ({"role": "user", "content": f"question {i}"},), f"answer {i}", rubric) for i in range(3)]


def test_per_criterion_judge_falls_back_retries_counts_and_caches(scripted_server, tmp_path):
    settings = JudgeSettings(url=scripted_server, model="scripted", mode="per-criterion", max_retries=2,
                             parse_retries=1)
    cache = VerdictCache(tmp_path / "cache.sqlite")
    judge = Judge(settings, cache)
    graded = judge.grade(items())
    assert [[v.met for v in verdicts] for verdicts in graded] == [[True, None, True, False]] * 3
    assert "structured output refused" in judge.stats.fallback
    assert judge.stats.unparseable == 3 and judge.stats.failed_calls == 0
    # 3 parsed criteria per answer once, the GARBAGE one twice (one parse retry); the 503s are retried by the client.
    assert len(ScriptedJudge.calls) == 3 * 3 + 3 * 2

    ScriptedJudge.calls.clear()
    again = Judge(settings, cache)
    regraded = again.grade(items())
    assert [[v.met for v in verdicts] for verdicts in regraded] == [[True, None, True, False]] * 3
    assert again.stats.cache_hits == 9 and len(ScriptedJudge.calls) == 3 * 2  # only the unparseable are asked again
    cache.close()


def test_per_answer_judge_keeps_rubric_order(scripted_server, tmp_path):
    settings = JudgeSettings(url=scripted_server, model="scripted", mode="per-answer", max_retries=0)
    cache = VerdictCache(tmp_path / "cache.sqlite")
    graded = Judge(settings, cache).grade(items())
    assert [[v.met for v in verdicts] for verdicts in graded] == [[True, False, True, False]] * 3
    assert len(ScriptedJudge.calls) == 3
    ScriptedJudge.calls.clear()
    Judge(settings, cache).grade(items())
    assert ScriptedJudge.calls == []


def test_unreachable_judge_and_unknown_model_are_named(scripted_server, tmp_path):
    cache = VerdictCache(tmp_path / "cache.sqlite")
    with pytest.raises(JudgeError, match="cannot reach the judge at http://127.0.0.1:9/v1"):
        Judge(JudgeSettings(url="http://127.0.0.1:9/v1", model="x", max_retries=0), cache).grade(items())
    with pytest.raises(JudgeError, match="does not serve 'other'; it serves: scripted"):
        Judge(JudgeSettings(url=scripted_server, model="other", max_retries=0), cache).grade(items())


@pytest.mark.slow
def test_a_cache_shared_by_ranks_waits_for_another_writer_longer_than_sqlites_default(tmp_path):
    """Rank A holds a write transaction for 6 s (SQLite's default busy timeout is 5 s); rank B's verdicts are
    written when A is done, not lost to 'database is locked'."""
    import sqlite3
    import threading

    from rgsd_pipeline.judge import Verdict

    path = tmp_path / "cache.sqlite"
    VerdictCache(path).close()
    holding, release = threading.Event(), threading.Event()

    def other_rank():
        db = sqlite3.connect(path)
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO verdicts VALUES ('a', 1, 'x', 'j')")
        holding.set()
        release.wait(6.0)
        db.commit()
        db.close()

    thread = threading.Thread(target=other_rank)
    thread.start()
    holding.wait(10)
    cache = VerdictCache(path)
    cache.put_many([("b", Verdict(met=False, explanation="y"))], "j")
    thread.join()
    assert cache.get("a").met and cache.get("b").met is False
    cache.close()
