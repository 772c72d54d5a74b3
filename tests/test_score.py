"""`rgsd-pipeline score` against independent references: brute-force log-softmax, the rollouts, vLLM."""

import shutil

import numpy as np
import polars as pl
import pytest
import torch
from helpers import cli, copy_run, kill_after_first_shard

from rgsd_pipeline.config import ScoreConfig, TemplateConfig
from rgsd_pipeline.models import load_model, load_tokenizer, resolve_model
from rgsd_pipeline.recipe import load_run_config
from rgsd_pipeline.render import chat_ids, teacher_messages
from rgsd_pipeline.shards import read_stage
from rgsd_pipeline.signals import decode_logprobs, loss_mask, storage_schema
from schemas import PROMPTS, ROLLOUTS

PREPARE = ["prepare", "--config", "configs/tiny.yaml", "engine.kind=hf", "data.max_prompts=24", "data.rows_per_shard=8"]


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """A tiny run with iteration 0 rollouts (HF engine, 24 prompts in 3 shards) and fp32 signals."""
    run = tmp_path_factory.mktemp("rolled") / "run"
    cli(*PREPARE, "score.value_dtype=float32", "score.top_k=8", "--run", run)
    cli("rollout", "--run", run, "--iteration", 0)
    return run


def signals(run, config=None):
    config = config or load_run_config(run)
    schema = storage_schema(config.score, len(load_tokenizer(resolve_model(config.model))))
    return read_stage(run / "iter-000" / "signals", schema)


def test_signals_equal_a_brute_force_teacher_forward_pass(rolled, tmp_path):
    run = copy_run(rolled, tmp_path / "run", without=("signals",))
    out = cli("score", "--run", run, "--iteration", 0).stdout
    assert "24 rollouts (0 skipped)" in out and "bytes per (token, k) entry" in out
    config = load_run_config(run)
    model, tokenizer = load_model(resolve_model("builtin:tiny")), load_tokenizer(resolve_model("builtin:tiny"))
    prompts = {p["prompt_id"]: p for p in read_stage(run / "prompts", PROMPTS).lazy().collect().to_dicts()}
    rollouts = read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect()
    stored = signals(run, config).lazy().collect()
    assert stored.select("prompt_id", "sample_idx").equals(rollouts.select("prompt_id", "sample_idx"))
    for rollout, signal in zip(rollouts.iter_rows(named=True), stored.iter_rows(named=True), strict=True):
        teacher_ids = chat_ids(tokenizer, teacher_messages(prompts[rollout["prompt_id"]], config.template))
        response = rollout["response_token_ids"]
        assert signal["teacher_prompt_len"] == len(teacher_ids)
        with torch.no_grad():
            logp = model(torch.tensor([teacher_ids + response])).logits[0].float().log_softmax(-1)
        logp = logp[len(teacher_ids) - 1:-1]
        top = logp.topk(8, dim=-1)
        np.testing.assert_allclose(np.array(signal["topk_logprobs"]), top.values.numpy(), atol=1e-4)
        assert (np.array(signal["topk_ids"]) == top.indices.numpy()).mean() > 0.99  # ties may swap
        np.testing.assert_allclose(signal["token_logprob"], logp[range(len(response)), response].numpy(), atol=1e-4)
        assert len(signal["loss_mask"]) == len(response) and all(signal["loss_mask"])


def test_a_teacher_that_sees_what_the_student_saw_reproduces_the_behaviour_logprobs(tmp_path):
    """Catches off-by-one alignment between rollouts and signals."""
    run = tmp_path / "same"
    cli(*PREPARE, "template.rubric_template={question}", "template.pitfalls=drop", "score.value_dtype=float32",
        "--run", run)
    cli("rollout", "--run", run, "--iteration", 0)
    cli("score", "--run", run, "--iteration", 0)
    rollouts = read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect()
    stored = signals(run).lazy().collect()
    assert (stored["teacher_prompt_len"] == rollouts["prompt_token_ids"].list.len()).all()
    behaviour = np.concatenate(rollouts["response_logprobs"].to_list())
    teacher = np.concatenate(stored["token_logprob"].to_list())
    np.testing.assert_allclose(teacher, behaviour, atol=2e-4)


def test_default_storage_is_compact_and_decodes_close_to_float32(rolled, tmp_path):
    run = tmp_path / "compact"
    cli(*PREPARE, "score.top_k=8", "--run", run)
    shutil.copytree(rolled / "iter-000" / "rollouts", run / "iter-000" / "rollouts")
    out = cli("score", "--run", run, "--iteration", 0).stdout
    per_entry = float(out.split(" bytes per (token, k) entry")[0].rsplit("take ", 1)[1])
    assert per_entry <= 2.5
    compact, exact = signals(run).lazy().collect(), signals(copy_scored(rolled, tmp_path)).lazy().collect()
    assert compact.schema["topk_ids"] == pl.List(pl.Array(pl.UInt16, 8))
    assert compact.schema["topk_logprobs"] == pl.List(pl.Array(pl.UInt8, 8))
    assert compact["topk_ids"].equals(exact["topk_ids"]) and compact["token_logprob"].equals(exact["token_logprob"])
    decoded = decode_logprobs(np.concatenate(compact["topk_logprobs"].to_list()).astype(np.uint8))
    reference = np.concatenate(exact["topk_logprobs"].to_list())
    # Rounding sqrt(-lp) * S moves it by at most e = 0.5 / S, so lp moves by at most 2 sqrt(-lp) e + e^2.
    e = 0.5 / 63.75
    assert (np.abs(decoded - reference) <= 2 * np.sqrt(-reference) * e + e * e + 1e-5).all()


def copy_scored(rolled, tmp_path):
    run = copy_run(rolled, tmp_path / "exact", without=("signals",))
    cli("score", "--run", run, "--iteration", 0)
    return run


def test_kill_during_score_then_resume_equals_uninterrupted(rolled, tmp_path):
    reference = copy_run(rolled, tmp_path / "reference", without=("signals",))
    killed = copy_run(rolled, tmp_path / "killed", without=("signals",))
    cli("score", "--run", reference, "--iteration", 0)
    done = kill_after_first_shard(["score", "--run", killed, "--iteration", 0], killed / "iter-000" / "signals")
    assert done < 3
    cli("score", "--run", killed, "--iteration", 0)
    assert signals(killed).lazy().collect().equals(signals(reference).lazy().collect())


def test_too_long_teacher_input_is_skipped_with_reason(rolled, tmp_path):
    run = copy_run(rolled, tmp_path / "run", without=("signals",), model__max_model_len=300)
    cli("score", "--run", run, "--iteration", 0)
    stored = signals(run).lazy().collect()
    skipped = stored.filter(pl.col("status") != "ok")
    assert skipped.height > 0 and skipped["status"][0].startswith("skipped:teacher prompt + response is")
    assert (skipped["token_logprob"].list.len() == 0).all()
    assert (stored.filter(pl.col("status") == "ok")["token_logprob"].list.len() > 0).all()


def test_student_and_teacher_must_share_a_tokenizer(rolled, tmp_path):
    run = copy_run(rolled, tmp_path / "run", without=("signals",))
    fake = tmp_path / "policy"
    shutil.copytree(resolve_model("builtin:tiny"), fake, ignore=shutil.ignore_patterns("rgsd-weights.json"))
    (fake / "chat_template.jinja").write_text("{{ messages }}")
    checkpoint = run / "iter-000" / "checkpoint"
    shutil.copytree(fake, checkpoint)
    shutil.copytree(run / "iter-000" / "rollouts", run / "iter-001" / "rollouts")
    result = cli("score", "--run", run, "--iteration", 1, check=False)
    assert result.returncode == 2 and "differ in tokenizer or chat template" in result.stderr


def test_think_mask_on_a_synthetic_response():
    open_ids, close_ids = [901], [902, 903]
    think, eos = (open_ids, close_ids), {0}
    plain_prompt = [1, 50, 51, 2]
    response = [5, 901, 6, 7, 902, 903, 8, 9, 0]
    assert loss_mask(response, eos, think, True, plain_prompt) == [1, 0, 0, 0, 0, 0, 1, 1, 1]
    assert loss_mask(response, eos, think, False, plain_prompt) == [1, 0, 0, 0, 0, 0, 1, 1, 0]
    # An unclosed span is masked to the end; no mask at all without think masking.
    assert loss_mask([8, 901, 6, 7], eos, think, True, plain_prompt) == [1, 0, 0, 0]
    assert loss_mask([8, 901, 6, 7], eos, None, True, plain_prompt) == [1, 1, 1, 1]


def test_think_mask_reads_a_span_the_chat_template_opened():
    """Qwen3-Thinking's generation prompt ends in '<think>\n': the response starts inside the span."""
    think, eos = ([901], [902, 903]), {0}
    opened = [1, 50, 2, 7, 901, 10]  # ... <|im_start|>assistant\n<think>\n
    closed_earlier = [1, 901, 60, 902, 903, 2, 7]  # a span opened and closed in an earlier turn
    # Closed: masked through the closing tag, the answer after it is distilled.
    assert loss_mask([6, 7, 902, 903, 8, 0], eos, think, True, opened) == [0, 0, 0, 0, 1, 1]
    # Truncated at max_new_tokens: neither tag in the response, all of it is reasoning.
    assert loss_mask([6, 7, 8, 9], eos, think, True, opened) == [0, 0, 0, 0]
    # The prompt's last span is closed: the response starts outside, as it would without a template.
    assert loss_mask([6, 7, 8, 9], eos, think, True, closed_earlier) == [1, 1, 1, 1]
    # Inside, then a second span the model opens and closes itself.
    assert loss_mask([6, 902, 903, 8, 901, 9, 902, 903, 4], eos, think, True, opened) == [0, 0, 0, 1, 0, 0, 0, 0, 1]


def test_think_mask_with_a_qwen_style_template_that_opens_the_span(tiny_tokenizer):
    """Through a real chat template and tokenizer: a ChatML template whose generation prompt opens <think>."""
    from rgsd_pipeline.models import CHATML_TEMPLATE
    from rgsd_pipeline.signals import token_span_ids

    tokenizer = tiny_tokenizer.__class__.from_pretrained(resolve_model("builtin:tiny"))
    tokenizer.chat_template = CHATML_TEMPLATE.replace("assistant\n' }}", "assistant\n<think>\n' }}")
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "Why?"}])
    assert tokenizer.decode(prompt).endswith("<think>\n")
    think = (token_span_ids(tokenizer, "<think>"), token_span_ids(tokenizer, "</think>"))
    reasoning = tokenizer.encode("Let me think.", add_special_tokens=False)
    answer = tokenizer.encode("\nBecause.", add_special_tokens=False)
    closed = reasoning + think[1] + answer
    mask = loss_mask(closed, {0}, think, True, prompt)
    assert mask == [False] * (len(reasoning) + len(think[1])) + [True] * len(answer)
    assert not any(loss_mask(reasoning, {0}, think, True, prompt))  # cut before </think>


def test_think_tags_resolve_to_tokens(tiny_tokenizer):
    from rgsd_pipeline.signals import token_span_ids

    ids = token_span_ids(tiny_tokenizer, "</think>")
    assert tiny_tokenizer.decode(ids) == "</think>"
    assert TemplateConfig().rubric_template.startswith("{question}") and ScoreConfig().top_k == 20


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_and_hf_signals_agree(rolled, tmp_path):
    hf, vllm = (copy_run(rolled, tmp_path / name, without=("signals",)) for name in ("hf", "vllm"))
    cli("score", "--run", hf, "--iteration", 0)
    assert "with vllm" in cli("score", "--run", vllm, "--iteration", 0, "--engine", "vllm").stdout
    a, b = signals(hf).lazy().collect(), signals(vllm).lazy().collect()
    assert a.select("prompt_id", "sample_idx", "teacher_prompt_len", "status", "loss_mask").equals(
        b.select("prompt_id", "sample_idx", "teacher_prompt_len", "status", "loss_mask"))
    for column in ("token_logprob", "topk_logprobs"):
        np.testing.assert_allclose(np.concatenate(b[column].to_list()), np.concatenate(a[column].to_list()), atol=3e-3)
    ids_a, ids_b = np.concatenate(a["topk_ids"].to_list()), np.concatenate(b["topk_ids"].to_list())
    assert (ids_a[:, 0] == ids_b[:, 0]).mean() > 0.97
