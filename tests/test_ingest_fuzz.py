"""Seeded fuzzing of ingestion: damaged copies of valid files never crash `prepare`, never cost an untouched row,
and every rejected row is named.

Each case writes a file of untouched valid rows (RubricHub, RaR, HealthBench and generic shapes) followed by
mutated rows: structure-level edits of a valid row (a key dropped or duplicated, a value of the wrong type,
points as text or fractions, deep nesting, lone surrogates, two spellings of the rubric) or byte-level edits
(bytes flipped, inserted, deleted; the line cut short). JSONL and JSON arrays alike: 300 cases by default,
3,000 more in the slow suite.
"""

import json
import random

import pyarrow as pa
import pytest

from rgsd_pipeline.config import DataConfig, TemplateConfig
from rgsd_pipeline.ingest import ingest
from rgsd_pipeline.shards import validate_table, write_jsonl_atomic
from schemas import PROMPTS, QUARANTINE

SEED = 20261128


def valid_row(rng: random.Random, i: int) -> dict:
    question = f"Case {i}: why does {rng.choice(['ice float', 'the heart beat', 'bread rise', 'a fever start'])}?"
    shape = rng.choice(["rubrichub", "rar", "healthbench", "generic"])
    if shape == "rar":
        return {"question": question, "id": f"rar-{i}",
                "rubric": [{"title": "t", "description": f"Essential Criteria: point {i}", "weight": 5},
                           {"title": "p", "description": "Pitfall Criteria: says nothing", "weight": -2}]}
    if shape == "healthbench":
        return {"prompt_id": f"hb-{i}", "prompt": [{"role": "user", "content": question}],
                "rubrics": [{"criterion": f"Names cause {i}", "points": 5, "tags": ["axis:accuracy"]}]}
    if shape == "generic":
        return {"messages": [{"role": "user", "content": question}], "criteria": [{"criterion": f"c{i}", "points": 2}]}
    return {"prompt": [{"role": "user", "content": question}], "extra_info": {"id": i},
            "Rubrics": [{"criterion": f"Explains {i}", "points": 4}, {"criterion": "Is rude", "points": -1}]}


ODD_VALUES = [None, 0, -1, 2.5, True, "", " ", "5", "nan", [], {}, [1, [2]], {"a": {"b": None}}, "\ud800", 1e308,
              "x" * 5000]


def structural(rng: random.Random, row: dict) -> str:
    """A structure-level mutation of a valid row, as JSON text."""
    row = json.loads(json.dumps(row))

    def some_dict(value):
        found = [value] if isinstance(value, dict) else []
        for child in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else []):
            found += some_dict(child)
        return found

    target = rng.choice(some_dict(row))
    kind = rng.randrange(8)
    if kind == 0 and target:
        del target[rng.choice(list(target))]
    elif kind == 1 and target:
        target[rng.choice(list(target))] = rng.choice(ODD_VALUES)
    elif kind == 2:
        key = rng.choice(["points", "weight", "criterion", "role", "content", "tags", "domain"])
        target[key] = rng.choice(ODD_VALUES)
    elif kind == 3:
        depth = rng.choice([5, 500, 5000, 100_000])
        text = json.dumps(row)
        return text[:-1] + f', "deep": {"[" * depth}{"]" * depth}}}'
    elif kind == 4 and target:  # the same key twice, with another value
        key = rng.choice(list(target))
        text = json.dumps(row)
        inner = json.dumps(target)
        again = f"{json.dumps(key)}: {json.dumps(rng.choice(ODD_VALUES))}"
        doubled = inner[:-1] + (", " if len(target) else "") + again + "}"
        return text.replace(inner, doubled, 1)
    elif kind == 5:
        row["rubrics" if "Rubrics" in row else "Rubrics"] = [{"criterion": "other", "points": 1}]
    elif kind == 6:
        return json.dumps([row]) if rng.random() < 0.5 else json.dumps(rng.choice(ODD_VALUES))
    else:
        row[rng.choice(["prompt", "question", "messages"])] = rng.choice(ODD_VALUES + [[{"role": "user"}]])
    return json.dumps(row, ensure_ascii=rng.random() < 0.5)


def byte_level(rng: random.Random, text: str) -> bytes:
    """Bytes flipped, inserted or deleted, or the row cut short."""
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(4)
        if kind == 0 and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[at:at] = bytes([rng.choice([0, 10, 34, 44, 91, 92, 93, 123, 125, 0xC3, 0xFF, rng.randrange(256)])])
        elif kind == 2:
            del data[at:at + rng.randint(1, 8)]
        else:
            del data[at:]
    return bytes(data)


def fuzz_file(rng: random.Random, path, case: int) -> int:
    """Write a damaged file; returns how many untouched valid rows lead it."""
    untouched = rng.randint(1, 6)
    rows = [valid_row(rng, case * 100 + i) for i in range(untouched + rng.randint(1, 8))]
    texts = [json.dumps(r) for r in rows[:untouched]]
    damaged = [structural(rng, r) if rng.random() < 0.6 else byte_level(rng, json.dumps(r)) for r in rows[untouched:]]
    encode = lambda t: t if isinstance(t, bytes) else t.encode("utf-8", "surrogatepass")  # noqa: E731
    if rng.random() < 0.7:
        path.write_bytes(b"\n".join(encode(t) for t in texts + damaged) + rng.choice([b"\n", b""]))
    else:
        path.write_bytes(b"[" + b",\n".join(encode(t) for t in texts + damaged) + b"]")
    return untouched


def check_case(case: int, tmp_path, tokenizer) -> None:
    rng = random.Random(f"{SEED}:{case}")
    path = tmp_path / f"case-{case}.{'jsonl'}"
    untouched = fuzz_file(rng, path, case)
    data = DataConfig(sources=[str(path)], heldout_fraction=0.0)
    try:
        result = ingest(data, TemplateConfig(), tokenizer)
    except Exception as err:  # noqa: BLE001 - any exception is the failure this test looks for
        pytest.fail(f"case {case} ({path}): {type(err).__name__}: {err}")
    kept = {p["source"] for p in result.prompts}
    assert {f"{path}:{i}" for i in range(1, untouched + 1)} <= kept, f"case {case}: a valid untouched row was lost"
    for entry in result.quarantine:
        assert entry["file"] == str(path) and entry["row"] >= 1 and entry["field"] and entry["reason"], (case, entry)
    if not path.read_bytes().lstrip().startswith(b"["):  # JSONL: every non-blank line is kept or named
        lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        assert len(result.prompts) + len(result.quarantine) == len(lines), f"case {case}: a row is unaccounted for"
    # What prepare writes next must take every kept and rejected row as it is.
    pa.Table.from_pylist(result.prompts, schema=PROMPTS.arrow)
    validate_table(pa.Table.from_pylist(result.quarantine, schema=QUARANTINE.arrow), QUARANTINE, str(path))
    write_jsonl_atomic(tmp_path / "quarantine.jsonl", result.quarantine)


def test_fuzzed_files_never_crash_lose_or_hide_a_row(tmp_path, tiny_tokenizer):
    for case in range(300):
        check_case(case, tmp_path, tiny_tokenizer)


@pytest.mark.slow
def test_fuzzed_files_long_run(tmp_path, tiny_tokenizer):
    for case in range(300, 3300):
        check_case(case, tmp_path, tiny_tokenizer)
