"""Benchmark: the score stage against a bare teacher forward pass, vLLM against HF, storage, peak memory.

    python bench/score.py [--models builtin:tiny builtin:smollm2-135m-instruct] [--prompts 16] [--tokens 64]
    python bench/score.py --guidance-only --models builtin:smollm2-135m-instruct --guidance 1.0

(1) score-stage response tokens/s over a bare HF forward pass (full logits, nothing else) on the same
teacher sequences in the same batches: the limit; goal >= 0.90. (2) vLLM over HF scoring tokens/s.
(3) bytes per (token, k) entry of the stored top-k columns. (4) peak memory of scoring one 2,048-token
sequence with a 151,936-entry vocabulary: chunked scoring against materialising the full logits. (5) rubric
guidance (score.guidance, rgsd_pipeline/guidance.py): the guided scoring's time over the plain one on the HF engine
(one more prefill), and, from vLLM's top-K' lists of both passes (score.guidance_candidates, 0: the whole
vocabulary), the time and the error against HF's exact guided distribution: the largest and mean absolute
difference of the K + 1 bucket probabilities (top-k and tail), and of the sampled token's guided log-prob.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEMORY_CODE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)).eval()
ids = torch.randint(0, 151936, (1, 2048))
MODE = "{mode}"
with torch.inference_mode():
    if MODE == "full":
        logp = model(ids).logits.float().log_softmax(-1)
        top = logp.topk(20, dim=-1)
    elif MODE == "chunked":
        from rgsd_pipeline.engines.hf_engine import HfEngine
        engine = HfEngine.__new__(HfEngine)
        engine.model, engine.batch_size, engine.pad_id, engine.device = model, 1, 0, torch.device("cpu")
        engine.score([ids[0].tolist()], [16], 20)
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["builtin:tiny", "builtin:smollm2-135m-instruct"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--memory-only", action="store_true", help="only the 150k-vocabulary peak-memory part")
    parser.add_argument("--guidance-only", action="store_true", help="only the rubric-guidance part")
    parser.add_argument("--guidance", type=float, default=1.0, help="the guidance scale g measured")
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 64, 256, 1024, 0],
                        help="vLLM's top-K' per pass (0: the whole vocabulary)")
    args = parser.parse_args()
    if args.guidance_only:
        for model in args.models:
            guidance(model, args)
        return

    import torch
    from common import GivenEngine, peak_memory_mb, record, timed

    from rgsd_pipeline import steps
    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.engines import make_engine
    from rgsd_pipeline.engines.hf_engine import left_pad, length_buckets
    from rgsd_pipeline.models import load_tokenizer, resolve_model
    from rgsd_pipeline.render import chat_ids, teacher_messages
    from rgsd_pipeline.shards import read_stage
    from rgsd_pipeline.signals import storage_schema, topk_bytes

    for model in args.models if not (args.memory_only or args.guidance_only) else []:
        results = {}
        path = resolve_model(model)
        tokenizer = load_tokenizer(path)
        config = load_config(None, [f"model.path={model}", f"data.max_prompts={args.prompts}",
                                    "data.heldout_fraction=0", f"data.rows_per_shard={args.prompts}",
                                    f"rollout.max_new_tokens={args.tokens}",
                                    f"engine.hf_batch_size={args.prompts}", "engine.vllm_enforce_eager=true",
                                    "engine.kind=hf"])
        prepared, prompts, rows = rolled_out(config, "bench-score-")
        teacher_ids = [chat_ids(tokenizer, teacher_messages(prompts[r["prompt_id"]], config.template)) for r in rows]
        sequences = [t + r["response_token_ids"] for t, r in zip(teacher_ids, rows, strict=True)]
        lens = [len(t) for t in teacher_ids]
        response_tokens = sum(len(r["response_token_ids"]) for r in rows)

        tokens_per_s = {}
        for kind in args.engines:
            engine = make_engine(kind, path, config.engine, config.model, max_logprobs=config.score.top_k)
            engine.score(sequences[:2], lens[:2], config.score.top_k)  # warm-up
            _, bare_engine_s = timed(lambda: engine.score(sequences, lens, config.score.top_k))
            tokens_per_s[kind] = response_tokens / bare_engine_s
            if kind == "hf":
                def forward_only():
                    with torch.inference_mode():
                        for batch in length_buckets([len(s) for s in sequences], config.engine.hf_batch_size):
                            ids, mask = left_pad([sequences[i] for i in batch], engine.pad_id)
                            positions = (mask.cumsum(-1) - 1).clamp(min=0)
                            engine.model(input_ids=ids, attention_mask=mask, position_ids=positions)
                _, forward_s = timed(forward_only)
                results["bare_forward_tokens_per_s"] = response_tokens / forward_s
            run = Path(tempfile.mkdtemp(prefix="bench-score-run-"))
            shutil.copytree(prepared, run, dirs_exist_ok=True)
            _, stage_s = timed(lambda: steps.score(run, 0, GivenEngine(engine)))
            results[f"{kind}_engine_tokens_per_s"] = tokens_per_s[kind]
            results[f"{kind}_stage_tokens_per_s"] = response_tokens / stage_s
            if kind == "hf":
                results["stage_over_bare_forward"] = (response_tokens / stage_s) / results["bare_forward_tokens_per_s"]
            stage = read_stage(run / "iter-000" / "signals", storage_schema(config.score, len(tokenizer)))
            results["bytes_per_topk_entry"] = topk_bytes(stage.files) / (response_tokens * config.score.top_k)
            shutil.rmtree(run)
            engine.close()
        if "vllm" in tokens_per_s and "hf" in tokens_per_s:
            results["vllm_over_hf"] = tokens_per_s["vllm"] / tokens_per_s["hf"]
        shutil.rmtree(prepared)
        record(f"score {model}", results)

    for model in args.models if not args.memory_only else []:
        guidance(model, args)
    full = peak_memory_mb(MEMORY_CODE.format(mode="full"))
    chunked = peak_memory_mb(MEMORY_CODE.format(mode="chunked"))
    baseline = peak_memory_mb(MEMORY_CODE.format(mode="none"))
    record("score peak memory, vocab 151936, 2048 tokens", {
        "process_baseline_mb": baseline, "full_logits_mb": full, "chunked_score_mb": chunked,
        "chunked_over_full_above_baseline": (chunked - baseline) / (full - baseline)})


def rolled_out(config, prefix: str) -> tuple[Path, dict, list[dict]]:
    """(run folder, prompts by id, rollout rows) of a fresh run of `config`, prepared and sampled with HF."""
    from rgsd_pipeline import steps
    from rgsd_pipeline.engines.hosting import StageEngines
    from rgsd_pipeline.recipe import freeze_or_check
    from rgsd_pipeline.shards import read_stage
    from schemas import PROMPTS, ROLLOUTS
    from stages.prepare import prepare

    run = Path(tempfile.mkdtemp(prefix=prefix))
    freeze_or_check(run, config)
    prepare(run, None, [], [], None)
    steps.rollout(run, 0, StageEngines("hf"))
    prompts = {p["prompt_id"]: p for p in read_stage(run / "prompts", PROMPTS).lazy().collect().to_dicts()}
    return run, prompts, read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect().to_dicts()


def guidance(model: str, args) -> None:
    """Rubric guidance's cost on HF and the error of vLLM's candidate lists against HF's exact guided signals, on the
    teacher sequences of a real rollout (builtin:howto, the demo's template)."""
    import numpy as np
    from common import record, timed

    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.engines import make_engine
    from rgsd_pipeline.guidance import Contrast
    from rgsd_pipeline.models import load_tokenizer, resolve_model
    from rgsd_pipeline.signals import teacher_inputs

    path = resolve_model(model)
    config = load_config("configs/smollm2-cpu.yaml", [
        f"model.path={model}", f"data.max_prompts={args.prompts}", "data.heldout_fraction=0",
        f"data.rows_per_shard={args.prompts}", f"rollout.max_new_tokens={args.tokens}",
        f"engine.hf_batch_size={args.prompts}", "engine.kind=hf", f"score.guidance={args.guidance}"])
    run, prompts, rows = rolled_out(config, "bench-guidance-")
    shutil.rmtree(run)
    inputs = teacher_inputs(rows, prompts, load_tokenizer(path), config.template, config.model.max_model_len,
                            config.score)
    contrast = Contrast(inputs.negatives, inputs.negative_lens, args.guidance)
    k = config.score.top_k
    tokens = sum(len(s) - p for s, p in zip(inputs.sequences, inputs.prompt_lens, strict=True))
    results = {"response_tokens": tokens}
    hf = make_engine("hf", path, config.engine, config.model)
    hf.score(inputs.sequences[:2], inputs.prompt_lens[:2], k)  # warm-up
    _, plain_s = timed(lambda: hf.score(inputs.sequences, inputs.prompt_lens, k))
    exact, guided_s = timed(lambda: hf.score_guided(inputs.sequences, inputs.prompt_lens, contrast, k))
    results.update(hf_plain_s=plain_s, hf_guided_s=guided_s, hf_guided_over_plain=guided_s / plain_s)
    hf.close()

    def buckets(scores):
        top = np.exp(np.concatenate([s.topk_logprobs_T_K for s in scores]).astype(np.float64))
        return np.concatenate([top, np.exp(np.concatenate([s.tail_logprob_T for s in scores]))[:, None]], axis=1)

    for candidates in args.candidates if "vllm" in args.engines else []:
        # The whole vocabulary at every prompt and response position is V Python floats per position in vLLM's
        # output (0.2 GB per SmolLM2 sequence of 160 tokens): measured on two sequences.
        n = len(inputs.sequences) if candidates else 2
        part = Contrast(contrast.sequences[:n], contrast.prompt_lens[:n], args.guidance)
        engine = make_engine("vllm", path, config.engine, config.model, max_logprobs=candidates or -1)
        engine.score_guided(inputs.sequences[:1], inputs.prompt_lens[:1],
                            Contrast(contrast.sequences[:1], contrast.prompt_lens[:1], args.guidance), k, candidates)
        got, seconds = timed(lambda: engine.score_guided(inputs.sequences[:n], inputs.prompt_lens[:n], part, k,
                                                          candidates))
        engine.close()
        # Ids may differ where two entries are within rounding; compare the probabilities of the buckets by rank.
        want, want_token = buckets(exact[:n]), np.concatenate([s.token_logprob_T for s in exact[:n]])
        difference = np.abs(buckets(got) - want)
        share = n / len(inputs.sequences)
        name = f"vllm_candidates_{candidates or 'all'}"
        results.update({f"{name}_sequences": n, f"{name}_s": seconds,
                        f"{name}_over_hf_guided": seconds / (guided_s * share),
                        f"{name}_max_abs_bucket_prob_error": float(difference.max()),
                        f"{name}_mean_abs_bucket_prob_error": float(difference.mean()),
                        f"{name}_mean_abs_token_logprob_error": float(np.abs(
                            np.concatenate([s.token_logprob_T for s in got]) - want_token).mean())})
    record(f"score, rubric guidance g={args.guidance:g}, {model}", results)


if __name__ == "__main__":  # vLLM starts its engine with spawn
    main()
