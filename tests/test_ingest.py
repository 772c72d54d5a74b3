"""Ingestion of whole files: every valid row survives, every broken row is quarantined with its reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgsd_pipeline.config import DataConfig, TemplateConfig
from rgsd_pipeline.ingest import ingest
from rgsd_pipeline.sources import SourceError, read_source, source_fingerprint


def good(i, fmt="rubrichub"):
    question = f"Question number {i}: how do vaccines work?"
    if fmt == "rar":
        return {"question": question, "rubric": [{"title": "t", "description": f"Explains antigen {i}", "weight": 5}]}
    if fmt == "healthbench":
        return {"prompt_id": f"hb-{i}", "prompt": [{"role": "user", "content": question}],
                "rubrics": [{"criterion": f"Explains antigen {i}", "points": 5, "tags": ["axis:accuracy"]}]}
    return {"prompt": [{"role": "user", "content": question}],
            "Rubrics": [{"criterion": f"Explains antigen {i}", "points": 5}]}


def run(sources, tokenizer, **data):
    return ingest(DataConfig(sources=[str(s) for s in sources], **data), TemplateConfig(), tokenizer)


def reasons(result):
    return {(q["row"], q["field"]): q["reason"] for q in result.quarantine}


def write_lines(path, lines, end=b"\n"):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + end)
    return path


def test_mixed_jsonl_keeps_valid_rows_and_quarantines_each_broken_row(tmp_path, tiny_tokenizer):
    long_prompt = {"prompt": [{"role": "user", "content": "word " * 3000}],
                   "Rubrics": [{"criterion": "c", "points": 1}]}
    lines = [
        json.dumps(good(1)),                                                                  # 1 ok
        "{not json",                                                                          # 2
        json.dumps({"prompt": [{"role": "wizard", "content": "hi"}], "Rubrics": [{"criterion": "c", "points": 1}]}),
        json.dumps(good(2)),                                                                  # 4 ok
        b'{"prompt": [{"role": "user", "content": "caf\xe9"}], "Rubrics": []}',               # 5 invalid UTF-8
        json.dumps(good(1)),                                                                  # 6 duplicate of 1
        json.dumps(long_prompt),                                                              # 7 over budget
        "",                                                                                   # 8 blank: skipped
        json.dumps([1, 2]),                                                                   # 9 not an object
        json.dumps(good(3)),                                                                  # 10 ok
        '{"prompt": [{"role": "user", "content": "cut off',                                   # 11 truncated
    ]
    path = write_lines(tmp_path / "mixed.jsonl", lines, end=b"")
    result = run([path], tiny_tokenizer, max_prompt_tokens=200)
    assert [p["source"] for p in result.prompts] == [f"{path}:1", f"{path}:4", f"{path}:10"]
    got = reasons(result)
    assert set(got) == {(2, "<row>"), (3, "prompt[0].role"), (5, "<row>"), (6, "prompt_id"), (7, "prompt"),
                        (9, "<row>"), (11, "<row>")}
    assert got[(2, "<row>")].startswith("not valid JSON")
    assert "unknown role 'wizard'" in got[(3, "prompt[0].role")]
    assert got[(5, "<row>")].startswith("invalid UTF-8")
    assert got[(6, "prompt_id")] == f"duplicate prompt: same messages and rubric as {path}:1"
    assert "over the token budget" in got[(7, "prompt")]
    assert "must be a JSON object" in got[(9, "<row>")]
    assert got[(11, "<row>")].startswith("truncated last line")
    assert all(q["file"] == str(path) for q in result.quarantine)
    assert "3 kept, 7 quarantined" in result.summary()


def test_bom_and_json_array_and_duplicate_source_ids(tmp_path, tiny_tokenizer):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(good(1)).encode() + b"\n")
    array = tmp_path / "array.json"
    clash = good(3, "healthbench") | {"prompt_id": "hb-2"}
    array.write_text(json.dumps([good(2, "healthbench"), clash, "oops"]))
    result = run([bom, array], tiny_tokenizer)
    assert [p["source"] for p in result.prompts] == [f"{bom}:1", f"{array}:1"]
    assert reasons(result) == {(2, "id"): f"duplicate id 'hb-2' with different content (first at {array}:1)",
                               (3, "<row>"): "array element is str, not an object"}


def test_empty_file_is_reported_not_fatal(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run([empty, write_lines(tmp_path / "one.jsonl", [json.dumps(good(1))])], tiny_tokenizer)
    assert len(result.prompts) == 1
    assert reasons(result) == {(0, "<file>"): "file is empty"}


def test_rar_and_healthbench_and_parquet_and_datasets_folder(tmp_path, tiny_tokenizer):
    import datasets

    rar = write_lines(tmp_path / "rar.jsonl", [json.dumps(good(i, "rar")) for i in range(3)]
                      + [json.dumps({"question": "q",
                                     "rubric": [{"title": "t", "description": "d", "weight": "nan"}]})])
    hb = write_lines(tmp_path / "hb.jsonl", [json.dumps(good(i, "healthbench")) for i in range(10, 12)])
    rows = [{"prompt": good(i)["prompt"][0]["content"], "rubric": json.dumps(good(i)["Rubrics"])}
            for i in range(20, 22)] + [{"prompt": "q", "rubric": "[]"}]
    parquet = tmp_path / "generic.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([good(i) for i in range(30, 32)]).save_to_disk(str(folder))

    result = run([rar, hb, parquet, folder], tiny_tokenizer)
    sources = [p["source"].rsplit(":", 1)[0] for p in result.prompts]
    assert sources.count(str(rar)) == 3 and sources.count(str(hb)) == 2
    assert sources.count(str(parquet)) == 2 and sources.count(str(folder)) == 2
    assert reasons(result) == {(4, "rubric[0].weight"): "points must be a number, got text 'nan'",
                               (3, "rubric"): "empty rubric: no criteria"}
    assert {p["domain"] for p in result.prompts if p["source"].startswith(str(hb))} == {"medical"}


def test_every_row_is_accounted_for(tmp_path, tiny_tokenizer):
    lines = [json.dumps(good(i)) for i in range(50)] + ["garbage"] * 5 + [json.dumps(good(0))]
    result = run([write_lines(tmp_path / "a.jsonl", lines)], tiny_tokenizer, heldout_fraction=0.3)
    assert len(result.prompts) + len(result.quarantine) == len(lines)
    assert {p["split"] for p in result.prompts} == {"train", "heldout"}


def test_one_question_with_two_rubrics_lands_in_one_split(tmp_path, tiny_tokenizer):
    """The split is drawn per question, not per prompt_id (which hashes the rubric too): the same question with a
    format rubric in one file and a content rubric in another must not be trained on in one and held out in the
    other, as builtin:howto and builtin:checkable share their questions."""
    form = [json.dumps(good(i)) for i in range(60)]
    content = [json.dumps({**good(i), "Rubrics": [{"criterion": f"Names antigen {i}", "points": 2}]})
               for i in range(60)]
    result = run([write_lines(tmp_path / "form.jsonl", form), write_lines(tmp_path / "content.jsonl", content)],
                 tiny_tokenizer, heldout_fraction=0.5)
    splits: dict[str, set] = {}
    for p in result.prompts:
        splits.setdefault(p["messages"][-1]["content"], set()).add(p["split"])
    assert len(splits) == 60 and all(len(s) == 1 for s in splits.values())
    assert {p["split"] for p in result.prompts} == {"train", "heldout"}
    assert len({p["prompt_id"] for p in result.prompts}) == 120  # two prompts per question, both kept


def test_unreadable_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(read_source(str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        list(read_source(str(bad)))
    text = tmp_path / "bad.txt"
    text.write_text("x")
    with pytest.raises(SourceError, match="unknown file type"):
        list(read_source(str(text)))
    with pytest.raises(SourceError, match="unknown built-in data set"):
        list(read_source("builtin:nope"))


def test_a_device_or_a_pipe_is_refused_before_it_is_read(tmp_path):
    """/dev/urandom was hashed for minutes; a pipe blocks its reader. Both are refused by their kind, unread (the
    pipe's writer and /dev/null would let a reader finish: on the old code both were fingerprinted)."""
    import os
    import threading

    pipe = tmp_path / "rows.jsonl"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text(json.dumps(good(1)) + "\n"), daemon=True)
    writer.start()
    for spec in (str(pipe), "/dev/null"):
        with pytest.raises(SourceError, match="is not a regular file or folder"):
            source_fingerprint(spec)
    with open(pipe) as reader:  # let the writer finish
        reader.read()
    writer.join(timeout=5)


def test_bundled_medsci_data_is_clean_and_balanced(tiny_tokenizer):
    result = run(["builtin:medsci"], tiny_tokenizer, max_prompt_tokens=100000)
    assert result.quarantine == []
    domains = [p["domain"] for p in result.prompts]
    assert len(domains) >= 120 and domains.count("medical") >= 60 and domains.count("science") >= 60
    for p in result.prompts:
        assert 5 <= len(p["rubric"]) <= 12
        assert all(float(c["points"]).is_integer() for c in p["rubric"])
    assert sum(any(c["points"] < 0 for c in p["rubric"]) for p in result.prompts) >= 30


def test_rows_that_would_crash_or_be_guessed_are_quarantined(tmp_path, tiny_tokenizer):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "Rubrics": []}'
    twice = '{"prompt": [{"role": "user", "content": "first"}], "Rubrics": [{"criterion": "c", "points": 1}], ' \
            '"prompt": [{"role": "user", "content": "second"}]}'
    same_twice = json.dumps(good(3))[:-1] + ', "domain": "science", "domain": "science"}'
    path = write_lines(tmp_path / "damaged.jsonl", [json.dumps(good(1)), deep, twice, same_twice, json.dumps(good(2))])
    result = run([path], tiny_tokenizer)
    assert [p["source"] for p in result.prompts] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert reasons(result) == {
        (2, "<row>"): "nested too deeply to be a row (JSON recursion limit)",
        (3, "prompt"): "key 'prompt' is given twice with different values; rgsd-pipeline does not choose between them"}


def test_a_damaged_element_of_a_json_array_costs_only_itself(tmp_path, tiny_tokenizer):
    elements = [json.dumps(good(1)), "[" * 50_000 + "]" * 50_000, '{"prompt": broken}', json.dumps(good(2)), "7"]
    path = tmp_path / "array.json"
    path.write_text("[" + ",\n".join(elements) + "]")
    result = run([path], tiny_tokenizer)
    assert [p["source"] for p in result.prompts] == [f"{path}:1", f"{path}:4"]
    got = reasons(result)
    assert got[(2, "<row>")] == "nested too deeply to be a row (JSON recursion limit)"
    assert got[(3, "<row>")].startswith("not valid JSON") and got[(5, "<row>")] == "array element is int, not an object"
    path.write_text("[" + ",\n".join(elements[:1] + ['{"prompt": [unclosed'] + elements[3:]) + "]")
    (row, quarantined), = [(q["row"], q["reason"]) for q in run([path], tiny_tokenizer).quarantine]
    assert row == 2 and "brackets do not close before the end of the file" in quarantined


def test_the_sources_own_ids_are_kept_in_the_prompt_rows(tmp_path, tiny_tokenizer):
    rows = [good(1, "healthbench"), good(2) | {"extra_info": {"id": "rh-2"}}, good(3, "rar") | {"id": 33}, good(4)]
    result = run([write_lines(tmp_path / "ids.jsonl", [json.dumps(r) for r in rows])], tiny_tokenizer)
    assert [p["source_id"] for p in result.prompts] == ["hb-1", "rh-2", "33", None]


def test_a_huge_row_is_refused_by_its_size_before_it_is_tokenized(tmp_path, tiny_tokenizer, monkeypatch):
    """A prompt far over the token budget is refused from its byte count (no token covers more bytes than the
    vocabulary's longest token), without the chat template and the tokenizer: a 50 MB row took them 44 s and 12 GB.
    A row under the bound is counted token by token, as before."""
    from rgsd_pipeline import ingest as module

    huge = good(1)
    huge["prompt"][0]["content"] = "word " * 200_000  # 1 MB
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(huge) + "\n" + json.dumps(good(2)) + "\n")
    tokenized = []
    counting = module.chat_ids
    monkeypatch.setattr(module, "chat_ids", lambda tok, messages: tokenized.append(messages) or counting(tok, messages))
    result = run([path], tiny_tokenizer, max_prompt_tokens=200)
    assert [q["row"] for q in result.quarantine] == [1] and "bytes, at least" in result.quarantine[0]["reason"]
    assert [p["messages"][0]["content"] for p in result.prompts] == [good(2)["prompt"][0]["content"]]
    assert all(len(m[0]["content"]) < 1000 for m in tokenized)  # the huge row never reached the tokenizer


def test_splitting_a_json_array_holds_memory_to_the_size_of_its_strings():
    """Python's re kept state for every character of a string token (`(?:[^"\\\\]|\\\\.)*`): an 8 MB string took
    about 1 GB to skip. In a fresh process, so that the high-water mark is this test's alone."""
    import subprocess
    import sys

    code = """
from rgsd_pipeline.sources import _array_elements
text = '[{"a": "' + 'x' * (8 << 20) + '"}, {"b": "\\\\\\\\" }]'
before = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])
elements = list(_array_elements(text))
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
print(len(elements), peak - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    elements, growth_kb = map(int, done.stdout.split())
    assert elements == 2 and growth_kb < 100 << 10
