"""Models and data sets by Hub id, from a pre-filled Hub cache in a temporary HF_HOME, offline (no network).

The cache is laid out as huggingface_hub lays it out (blobs, snapshots/<commit>/ symlinks, refs/), filled with the
tiny built-in models; the Hub's own error answers (gated, unknown repository or revision) come from a stand-in
endpoint on 127.0.0.1.
"""

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import CLI, ROOT, fill_hub_cache, model_files

MAIN = "1" * 40  # the commit refs/main points at
SECOND = "2" * 40  # tag v2: another model (tiny-qwen2, same tokenizer)
DATA = "d" * 40
SETTINGS = ["--config", "configs/tiny.yaml", "engine.kind=hf", "data.max_prompts=8", "data.rows_per_shard=8",
            "rollout.max_new_tokens=16", "train.batch_size=8", "train.micro_batch_size=8"]


def run_cli(*args, env, check=True):
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture
def hub_env(tmp_path, model_cache, tiny_path):
    """An HF_HOME whose Hub cache holds rgsd-test/tiny (main: builtin:tiny, v2: builtin:tiny-qwen2), offline."""
    from rgsd_pipeline.models import resolve_model

    home = tmp_path / "hf"
    fill_hub_cache(home, "rgsd-test/tiny", model_files(tiny_path), MAIN)
    fill_hub_cache(home, "rgsd-test/tiny", model_files(resolve_model("builtin:tiny-qwen2")), SECOND, refs=("v2",))
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def frozen(run: Path) -> dict:
    return yaml.safe_load((run / "run.yaml").read_text())


@pytest.mark.slow
def test_a_hub_id_from_the_cache_runs_an_iteration_and_every_later_command_reads_the_frozen_commit(
        hub_env, tiny_path, tmp_path):
    from rgsd_pipeline.fingerprints import model_fingerprint
    from rgsd_pipeline.models import resolve_model

    run = tmp_path / "run"
    run_cli("iterate", *SETTINGS, "--run", run, "--iterations", 1, "model.path=rgsd-test/tiny", env=hub_env)
    assert frozen(run)["model"] == {**frozen(run)["model"], "path": "rgsd-test/tiny", "revision": "main",
                                    "commit": MAIN}
    chain = json.loads((run / "chain.json").read_text())
    # The snapshot read is builtin:tiny's files, byte for byte: the same weight fingerprint as the folder itself.
    assert chain[0]["policy_fingerprint"] == model_fingerprint(tiny_path)

    # The checkpoint carries a model card; `export` writes it again with the held-out evaluation, beside weights that
    # plain transformers loads and whose fingerprint is the checkpoint's (the card is no part of it).
    assert "Not evaluated yet" in (run / "iter-000" / "checkpoint" / "README.md").read_text()
    run_cli("evaluate", "--run", run, "--iteration", 0, "--max-prompts", 2, "--no-divergence", env=hub_env)
    exported = tmp_path / "exported"
    run_cli("export", "--run", run, "--iteration", 0, "--to", exported, env=hub_env)
    card = (exported / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["base_model"] == "rgsd-test/tiny" and header["library_name"] == "transformers"
    assert "rgsd" in header["tags"]
    assert MAIN in card and chain[0]["policy_fingerprint"] in card and chain[0]["checkpoint_fingerprint"] in card
    assert "- iter-000: mean length" in card and "(2 held-out answers)" in card
    assert model_fingerprint(exported) == chain[0]["checkpoint_fingerprint"]
    assert_same_logits(exported, run / "iter-000" / "checkpoint")
    refused = run_cli("export", "--run", run, "--iteration", 0, "--to", exported, env=hub_env, check=False)
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr

    # main moves on to another model: the run still reads its commit (else its outputs would be refused as stale,
    # their teacher and policy being another model's), and the recipe given again is accepted.
    refs = Path(hub_env["HF_HOME"]) / "hub" / "models--rgsd-test--tiny" / "refs" / "main"
    refs.write_text(SECOND)
    run_cli("prepare", *SETTINGS, "--run", run, "model.path=rgsd-test/tiny", env=hub_env)
    out = run_cli("iterate", "--run", run, "--iterations", 1, env=hub_env).stdout
    assert "1 iteration(s) complete" in out
    assert frozen(run)["model"]["commit"] == MAIN

    # model.revision picks the other commit of the same cache.
    other = tmp_path / "other"
    run_cli("prepare", *SETTINGS, "--run", other, "model.path=rgsd-test/tiny", "model.revision=v2", env=hub_env)
    assert frozen(other)["model"]["commit"] == SECOND
    run_cli("rollout", "--run", other, "--iteration", 0, env=hub_env)
    manifest = json.loads((other / "iter-000" / "rollouts" / "manifest.json").read_text())
    assert manifest["inputs"]["policy"] == model_fingerprint(resolve_model("builtin:tiny-qwen2"))


def assert_same_logits(folder: Path, reference, atol=1e-5):
    """`folder` loads with plain transformers and gives `reference`'s logits (a folder, or a loaded model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("What does the heart do?")["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(reference) if isinstance(reference, Path) else reference
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder).float()(ids).logits,
                                   reference.float()(ids).logits, atol=atol, rtol=0)


def test_a_hub_id_missing_offline_is_named_with_the_command_that_downloads_it(hub_env, tmp_path):
    result = run_cli("prepare", *SETTINGS, "--run", tmp_path / "run", "model.path=rgsd-test/absent",
                     "model.revision=v1.0", env=hub_env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "rgsd-test/absent at revision 'v1.0' is not in the Hub cache" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr
    assert ("hf download rgsd-test/absent --revision v1.0 --include '*.json' --include '*.safetensors'"
            in result.stderr)
    assert not (tmp_path / "run" / "run.yaml").exists()  # nothing frozen that could not be read


def test_a_hub_repository_without_safetensors_is_refused(hub_env, tiny_path, tmp_path):
    files = {name: data for name, data in model_files(tiny_path).items() if not name.endswith(".safetensors")}
    fill_hub_cache(hub_env["HF_HOME"], "rgsd-test/pickled", {**files, "pytorch_model.bin": b"pickle"}, MAIN)
    result = run_cli("prepare", *SETTINGS, "--run", tmp_path / "run", "model.path=rgsd-test/pickled", env=hub_env,
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"rgsd-test/pickled at revision 'main' (commit {MAIN}) has no safetensors weights" in result.stderr
    assert "never downloads *.bin" in result.stderr


class StandInHub(BaseHTTPRequestHandler):
    """The Hub's answers for what no cache can hold: a gated repository, an unknown one, an unknown revision."""

    def do_GET(self):
        if self.path.startswith("/api/models/rgsd-test/gated/"):
            self.answer(401, "GatedRepo", "Access to model rgsd-test/gated is restricted.")
        elif self.path.startswith("/api/models/rgsd-test/tiny/revision/nope"):
            self.answer(404, "RevisionNotFound", "Invalid rev id: nope")
        else:
            self.answer(404, "RepoNotFound", "Repository not found")

    do_HEAD = do_GET

    def answer(self, status, code, message):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_gated_unknown_and_missing_revision_errors_name_the_id_and_revision(hub_env, stand_in_hub, tmp_path):
    env = {**hub_env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": stand_in_hub, "HF_HUB_ETAG_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    expected = {("rgsd-test/gated", "main"): "rgsd-test/gated at revision 'main' is gated: accept its conditions",
                ("rgsd-test/nowhere", "main"): "rgsd-test/nowhere at revision 'main': no such repository on the Hub, "
                                               "or it is private",
                ("rgsd-test/tiny", "nope"): "rgsd-test/tiny at revision 'nope': the repository has no such branch"}
    for (repo, revision), message in expected.items():
        result = run_cli("prepare", *SETTINGS, "--run", tmp_path / repo.split("/")[1], f"model.path={repo}",
                         f"model.revision={revision}", env=env, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, result.stderr


def rubrichub_rows(start: int, count: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Explain topic number {i} of human physiology."}],
             "Rubrics": [{"criterion": f"Names the organ involved in topic {i}", "points": 3.0},
                         {"criterion": "Is accurate", "points": 2.0}],
             "extra_info": {"id": f"rh-{i}"}} for i in range(start, start + count)]


def write_parquet(rows: list[dict]) -> bytes:
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("Rubrics", pa.list_(pa.struct([("criterion", pa.string()), ("points", pa.float64())]))),
                        ("extra_info", pa.struct([("id", pa.string())]))])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.slow
def test_a_hub_data_set_from_the_cache_is_ingested_strictly_and_its_commit_frozen(hub_env, tmp_path):
    train = rubrichub_rows(0, 6)
    train[2]["Rubrics"][0]["points"] = None  # row 3: a criterion without points
    train[4]["prompt"] = []  # row 5: no prompt
    fill_hub_cache(hub_env["HF_HOME"], "rgsd-test/rubrics",
                   {"data/train-00000-of-00001.parquet": write_parquet(train),
                    "data/test-00000-of-00001.parquet": write_parquet(rubrichub_rows(100, 3)),
                    "RuRL/medical.parquet": write_parquet(rubrichub_rows(200, 4))},
                   DATA, repo_type="dataset")
    run = tmp_path / "run"
    sources = ("data.sources=[hf:rgsd-test/rubrics, {hf: rgsd-test/rubrics, split: test}, "
               "{hf: rgsd-test/rubrics, data_files: RuRL/medical.parquet}]")
    out = run_cli("prepare", "--config", "configs/tiny.yaml", "--run", run, sources, "data.heldout_fraction=0",
                  env=hub_env).stdout
    assert "hf:rgsd-test/rubrics[train]: 6 rows read, 4 kept, 2 quarantined" in out
    assert "hf:rgsd-test/rubrics[test]: 3 rows read, 3 kept, 0 quarantined" in out
    assert "hf:rgsd-test/rubrics/RuRL/medical.parquet[train]: 4 rows read, 4 kept" in out

    quarantine = [json.loads(line) for line in (run / "prompts" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["row"], q["field"]) for q in quarantine] == [
        ("hf:rgsd-test/rubrics[train]", 3, "Rubrics[0].points"), ("hf:rgsd-test/rubrics[train]", 5, "prompt")]
    import polars as pl

    prompts = pl.read_parquet(run / "prompts" / "part-00000.parquet")
    assert sorted(prompts["source_id"].to_list()) == sorted(
        [f"rh-{i}" for i in (0, 1, 3, 5, 100, 101, 102, 200, 201, 202, 203)])
    assert "hf:rgsd-test/rubrics[train]:4" in prompts["source"].to_list()

    entries = frozen(run)["data"]["sources"]
    assert [(e["hf"], e["split"], e["data_files"], e["revision"], e["commit"]) for e in entries] == [
        ("rgsd-test/rubrics", "train", None, "main", DATA), ("rgsd-test/rubrics", "test", None, "main", DATA),
        ("rgsd-test/rubrics", "train", "RuRL/medical.parquet", "main", DATA)]
    inputs = json.loads((run / "prompts" / "manifest.json").read_text())["inputs"]
    assert inputs["source:hf:rgsd-test/rubrics[train]"] == DATA
    assert inputs["source:hf:rgsd-test/rubrics/RuRL/medical.parquet[train]"] == DATA
    # The same recipe again: its sources name the frozen commits, so the complete prompts are accepted.
    again = run_cli("prepare", "--config", "configs/tiny.yaml", "--run", run, sources, "data.heldout_fraction=0",
                    env=hub_env).stdout
    assert "prompts already complete" in again


def test_a_misspelled_hub_source_is_refused_naming_the_key(hub_env, tmp_path):
    result = run_cli("prepare", "--config", "configs/tiny.yaml", "--run", tmp_path / "run",
                     "data.sources=[{hf: rgsd-test/rubrics, splt: test}]", env=hub_env, check=False)
    assert result.returncode == 2 and "unknown key 'splt'" in result.stderr, result.stderr
    result = run_cli("prepare", "--config", "configs/tiny.yaml", "--run", tmp_path / "run",
                     "model.revision=v2", env=hub_env, check=False)
    assert result.returncode == 2 and "model.path builtin:tiny is a local folder or a built-in" in result.stderr


def test_plan_reads_a_shipped_recipe_by_hub_id_from_its_config_alone(hub_env):
    """configs/qwen2.5-7b-medical.yaml as shipped names Qwen/Qwen2.5-7B-Instruct; with only its config.json in the
    cache, `plan` works (no weights are fetched to plan), and its arithmetic is Qwen2.5-7B's: 7.62e9 parameters
    at 16 bytes of training state each are 113.5 GiB, which one GPU cannot hold."""
    from test_memory_plan import QWEN25_7B

    fill_hub_cache(hub_env["HF_HOME"], "Qwen/Qwen2.5-7B-Instruct", {"config.json": json.dumps(QWEN25_7B).encode()},
                   MAIN)
    recipe = ROOT / "configs" / "qwen2.5-7b-medical.yaml"
    assert "peak" in run_cli("plan", "--config", recipe, env=hub_env).stdout
    result = run_cli("plan", "--config", recipe, "--gpus-per-node", 1, env=hub_env, check=False)
    assert result.returncode == 2 and "113.5 GiB   float32 weights" in result.stderr, result.stderr
