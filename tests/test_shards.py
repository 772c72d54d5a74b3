"""Shard writer and reader: atomic shards, resume, checksums, locks, schema round trips."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from rgsd_pipeline.shards import (
    ArtifactError,
    LockedError,
    ShardPlan,
    StageOutput,
    exclusive_lock,
    read_stage,
    shard_file,
    split_into_shards,
)
from schemas import PROMPTS, ROLLOUTS, signals_schema


def prompt_rows(start, count):
    return [{"prompt_id": f"p{i:05d}", "messages": [{"role": "user", "content": f"question {i}"}],
             "rubric": [{"criterion": f"criterion {i}", "points": 2.0, "tags": []}], "source": f"f.jsonl:{i}",
             "domain": "science", "reference_answer": None, "split": "train", "prompt_tokens": 7}
            for i in range(start, start + count)]


def write_all(folder, shards=3, rows=4, inputs=None, plan=None):
    with StageOutput(folder, PROMPTS, inputs or {"config": "abc"}, plan or ShardPlan(shards)) as out:
        for index in out.todo():
            out.write_shard(index, pa.Table.from_pylist(prompt_rows(index * rows, rows), schema=PROMPTS.arrow))
        return out.finalize()


def test_round_trip_through_pyarrow_polars_and_datasets(tmp_path):
    import datasets

    assert write_all(tmp_path / "p")
    stage = read_stage(tmp_path / "p", PROMPTS)
    assert stage.rows == 12 and len(stage.files) == 3
    table = stage.dataset().to_table()
    assert table.column("prompt_id").to_pylist() == [f"p{i:05d}" for i in range(12)]
    assert table.schema.field("rubric").type == PROMPTS.arrow.field("rubric").type
    frame = stage.lazy().collect()
    assert frame["messages"][3][0]["content"] == "question 3"
    hf = datasets.Dataset.from_parquet([str(f) for f in stage.files])
    assert hf[5]["rubric"][0]["criterion"] == "criterion 5"


def test_writer_refuses_rows_that_break_the_schema(tmp_path):
    rows = prompt_rows(0, 2)
    rows[1]["prompt_id"] = None
    with StageOutput(tmp_path / "p", PROMPTS, {}, ShardPlan(1)) as out:
        with pytest.raises(ArtifactError, match="row 1 field 'prompt_id' is null"):
            out.write_shard(0, pa.Table.from_pylist(rows, schema=PROMPTS.arrow.remove_metadata()))
        with pytest.raises(ArtifactError, match="columns"):
            out.write_shard(0, pa.table({"x": [1]}))
    assert not (tmp_path / "p" / shard_file(0)).exists()


def test_reader_refuses_incomplete_corrupt_foreign_and_escaping_outputs(tmp_path):
    with StageOutput(tmp_path / "p", PROMPTS, {}, ShardPlan(2)) as out:
        out.write_shard(0, pa.Table.from_pylist(prompt_rows(0, 2), schema=PROMPTS.arrow))
        assert out.finalize() is False
    with pytest.raises(ArtifactError, match="not complete"):
        read_stage(tmp_path / "p", PROMPTS)

    write_all(tmp_path / "ok")
    with pytest.raises(ArtifactError, match="expected 'rollouts'"):
        read_stage(tmp_path / "ok", ROLLOUTS)
    with pytest.raises(ArtifactError, match="made from other inputs"):
        read_stage(tmp_path / "ok", PROMPTS, expect_inputs={"config": "other"})

    shard = tmp_path / "ok" / shard_file(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{shard} does not match its checksum"):
        read_stage(tmp_path / "ok", PROMPTS)

    write_all(tmp_path / "esc")
    manifest_path = tmp_path / "esc" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["file"] = "../../etc/passwd"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="refusing to read it"):
        read_stage(tmp_path / "esc", PROMPTS)


def test_resume_refuses_changed_inputs(tmp_path):
    with StageOutput(tmp_path / "p", PROMPTS, {"config": "a"}, ShardPlan(2)) as out:
        out.write_shard(0, pa.Table.from_pylist(prompt_rows(0, 2), schema=PROMPTS.arrow))
    with pytest.raises(ArtifactError, match="config: 'a' -> 'b'"):
        StageOutput(tmp_path / "p", PROMPTS, {"config": "b"}, ShardPlan(2)).__enter__()


def test_lock_refuses_a_second_writer_and_is_released_by_death(tmp_path):
    lock = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from rgsd_pipeline.shards import exclusive_lock
        with exclusive_lock(__import__('pathlib').Path({str(lock)!r}), 'x'):
            print('held', flush=True); time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        with exclusive_lock(lock, "x"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive_lock(lock, "x"):
        pass


def test_sharded_workers_together_equal_one_worker(tmp_path):
    write_all(tmp_path / "one", shards=5)
    for worker in range(3):
        write_all(tmp_path / "many", shards=5, plan=ShardPlan(5, num_workers=3, worker_index=worker))
    one, many = read_stage(tmp_path / "one", PROMPTS), read_stage(tmp_path / "many", PROMPTS)
    assert one.dataset().to_table().equals(many.dataset().to_table())
    assert [s["sha256"] for s in one.manifest["shards"]] == [s["sha256"] for s in many.manifest["shards"]]


WRITER = textwrap.dedent("""
    import sys, pyarrow as pa
    sys.path.insert(0, {tests!r})
    from test_shards import prompt_rows
    from rgsd_pipeline.shards import StageOutput, ShardPlan
    from schemas import PROMPTS
    with StageOutput({folder!r}, PROMPTS, {{"config": "x"}}, ShardPlan(12)) as out:
        for index in out.todo():
            out.write_shard(index, pa.Table.from_pylist(prompt_rows(index * 3000, 3000), schema=PROMPTS.arrow))
        out.finalize()
""")


@pytest.mark.slow
def test_kill_during_writes_never_leaves_a_visible_partial_shard_and_resume_completes(tmp_path):
    import pyarrow.parquet as pq

    folder = tmp_path / "killed"
    script = WRITER.format(tests=os.path.dirname(__file__), folder=str(folder))
    for delay in (1.2, 1.9, 2.6, 3.3):
        writer = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        for shard in folder.glob("part-*.parquet"):
            assert pq.read_metadata(shard).num_rows == 3000  # every visible shard is whole
        assert not (folder / "_SUCCESS").exists() or len(list(folder.glob("part-*.parquet"))) == 12
    subprocess.run([sys.executable, "-c", script], check=True)
    stage = read_stage(folder, PROMPTS)
    ids = stage.lazy().select("prompt_id").collect()["prompt_id"].to_list()
    assert ids == [f"p{i:05d}" for i in range(12 * 3000)]
    assert not list(folder.glob(".part-*.tmp-*"))  # temporaries of killed writers are cleaned up


def test_signals_schema_has_fixed_size_topk_lists():
    schema = signals_schema(k=4, value_type=pa.float16(), id_type=pa.uint16())
    assert schema.arrow.field("topk_ids").type == pa.list_(pa.list_(pa.uint16(), 4))
    assert schema.arrow.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 4))


def test_an_output_of_an_older_schema_version_is_refused_with_what_to_do(tmp_path):
    import dataclasses

    folder = tmp_path / "prompts"
    older = dataclasses.replace(PROMPTS, version=PROMPTS.version - 1)
    with StageOutput(folder, older, {"config": "abc"}, ShardPlan(1)) as out:
        out.write_shard(0, pa.Table.from_pylist(prompt_rows(0, 2), schema=PROMPTS.arrow))
        out.finalize()
    with pytest.raises(ArtifactError, match=rf"holds schema 'prompts' v{PROMPTS.version - 1}, expected 'prompts' "
                                            rf"v{PROMPTS.version}; it was written by an earlier rgsd-pipeline: delete"):
        read_stage(folder, PROMPTS)


def test_shards_describe_their_columns_and_signals_their_encoding(tmp_path):
    import pyarrow.parquet as pq

    from rgsd_pipeline.signals import read_encoding
    from schemas import DESCRIPTION_KEY

    write_all(tmp_path / "prompts", shards=1)
    schema = pq.read_schema(tmp_path / "prompts" / shard_file(0))
    assert b"content hash" in schema.field("prompt_id").metadata[DESCRIPTION_KEY]
    signals = signals_schema(k=4)
    with StageOutput(tmp_path / "signals", signals, {"x": "y"}, ShardPlan(1)) as out:
        out.write_shard(0, pa.Table.from_pylist([], schema=signals.arrow))
        out.finalize()
    encoding = read_encoding(tmp_path / "signals" / shard_file(0))
    assert encoding["k"] == 4 and encoding["topk_ids"]["type"] == "uint16"
    assert encoding["topk_logprobs"]["decode"] == "logprob = -(code / 63.75) ** 2"


@pytest.mark.parametrize("rows, per_shard, workers", [(64, 2000, 8), (107, 16, 2), (3, 4, 8), (0, 4, 8), (10, 4, 1),
                                                      (50, 5, 4), (9, 1000, 2)])
def test_an_output_has_a_shard_for_every_worker_while_there_are_rows(rows, per_shard, workers):
    """The qwen recipes' one shard of 2000 rows for 64 rollouts gave rank 0 all of them and 7 ranks nothing."""
    items = list(range(rows))
    pieces = split_into_shards(items, per_shard, workers)
    assert [i for piece in pieces for i in piece] == items  # consecutive, nothing lost or repeated
    assert all(len(p) <= per_shard for p in pieces)
    shares = [sum(len(p) for p in pieces[w::workers]) for w in range(workers)]
    assert min(shares) > 0 or rows < workers
    assert max(shares) - min(shares) <= max(1, -(-rows // len(pieces)))  # no worker holds more than a shard extra
    if workers == 1:
        assert pieces == ([items[i:i + per_shard] for i in range(0, rows, per_shard)] or [[]])  # unchanged layout
    # a resume with another number of workers keeps the layout the output was begun with
    assert split_into_shards(items, per_shard, 3, started=len(pieces)) == pieces
