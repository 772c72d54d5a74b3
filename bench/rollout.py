"""Benchmark: the rollout stage against the bare engine call it wraps, and vLLM against transformers.

    python bench/rollout.py [--models builtin:tiny builtin:smollm2-135m-instruct] [--prompts 16] [--tokens 64]

For each model: (1) the stage's tokens/s over the bare `engine.generate` on the same prompts, seeds and
settings, with the engine built once and shared, so the ratio measures what the stage adds (reading
prompts, chat templates, the too-long check, decoding, Parquet shards, checksums); goal >= 0.95.
(2) vLLM tokens/s over HF tokens/s at the same batch, sampling from the model's own distribution
(`vllm_over_hf`), and (3) the same at the demo's sampling settings (configs/smollm2-cpu.yaml: temperature,
top-p, repetition penalty, and its response length, 160 tokens, whatever `--tokens` says: HF's step grows with
the sequence, vLLM's paged step hardly; `vllm_over_hf_demo_sampling`), where both record the model's own
log-probs only; goal >= 2.5 for both. (4) With `--settings`: where vLLM's time goes at the demo's settings, one
engine sampling the same prompts with the settings added one by one (the model's own distribution, temperature,
top-p, repetition penalty), interleaved, and a second engine that also records the behaviour log-probs
(its second prefill pass; train.loss=sampled_reverse_kl). (5) With `--demo-rollout`: the demo's rollout stage as
configs/smollm2-cpu.yaml runs it, with each engine: its 64 training prompts, vLLM given them all at once, HF in
batches of engine.hf_batch_size (`vllm_over_hf`, engines built beforehand). Prints the ratios and writes
bench/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["builtin:tiny", "builtin:smollm2-135m-instruct"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", action="store_true", help="only (4): vLLM's time per sampling setting")
    parser.add_argument("--demo-rollout", action="store_true", help="only (5): the demo's rollout with each engine")
    args = parser.parse_args()

    from common import record, timed

    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.engines import Sampling, make_engine
    from rgsd_pipeline.models import load_tokenizer, resolve_model
    from rgsd_pipeline.render import chat_ids, student_messages
    from rgsd_pipeline.sampling import sample_seed
    from rgsd_pipeline.shards import read_stage
    from schemas import PROMPTS

    if args.demo_rollout:
        record("demo rollout", demo_rollout(args))
        return
    for model in args.models:
        results = {}
        path = resolve_model(model)
        tokenizer = load_tokenizer(path)
        overrides = [f"model.path={model}", f"data.max_prompts={args.prompts}", "data.heldout_fraction=0",
                     f"data.rows_per_shard={args.prompts}", f"rollout.max_new_tokens={args.tokens}",
                     "rollout.temperature=1.0", f"engine.hf_batch_size={args.prompts}",
                     "engine.vllm_enforce_eager=true"]
        config = load_config(None, overrides)
        # The same prompts and per-sample seeds the stage will use, so both sample identical tokens.
        prepared = prepared_run(config)
        rows = read_stage(prepared / "prompts", PROMPTS).lazy().collect().to_dicts()
        prompts = [chat_ids(tokenizer, student_messages(r, config.template)) for r in rows]
        seeds = [sample_seed(config.rollout.seed, r["prompt_id"], 0, seed_round=0) for r in rows]
        sampling = Sampling(temperature=1.0, max_new_tokens=args.tokens)
        if args.settings:
            record(f"vllm sampling settings {model}", settings_breakdown(path, config, prompts, seeds, args))
            shutil.rmtree(prepared)
            continue
        tokens_per_s = {}
        for kind in args.engines:
            engine = make_engine(kind, path, config.engine, config.model)
            engine.generate(prompts[:2], seeds[:2], Sampling(max_new_tokens=4))  # warm-up
            bare_rates, stage_rates = [], []
            for _ in range(args.repeats):  # alternate bare and stage so drift hits both alike
                bare, bare_s = timed(lambda engine=engine: engine.generate(prompts, seeds, sampling))
                bare_rates.append(sum(len(g.token_ids) for g in bare) / bare_s)
                _, stage_tokens, stage_s = timed_stage(prepared, engine)
                stage_rates.append(stage_tokens / stage_s)
            engine.close()
            tokens_per_s[kind] = statistics.median(bare_rates)
            results[f"{kind}_bare_tokens_per_s"] = tokens_per_s[kind]
            results[f"{kind}_stage_tokens_per_s"] = statistics.median(stage_rates)
            ratios = [s / b for s, b in zip(stage_rates, bare_rates, strict=True)]
            results[f"{kind}_stage_over_bare"] = statistics.median(ratios)
        if "vllm" in tokens_per_s and "hf" in tokens_per_s:
            results["vllm_over_hf"] = tokens_per_s["vllm"] / tokens_per_s["hf"]
            demo = Sampling.of(load_config(ROOT / "configs" / "smollm2-cpu.yaml", []))
            rates = {}
            for kind in ("hf", "vllm"):
                engine = make_engine(kind, path, config.engine, config.model, sampling=demo)
                engine.generate(prompts[:2], seeds[:2], dataclasses.replace(demo, max_new_tokens=4))  # warm-up
                runs = [timed(lambda engine=engine: engine.generate(prompts, seeds, demo)) for _ in range(args.repeats)]
                rates[kind] = statistics.median(sum(len(g.token_ids) for g in out) / s for out, s in runs)
                engine.close()
                results[f"{kind}_demo_sampling_tokens_per_s"] = rates[kind]
            results["vllm_over_hf_demo_sampling"] = rates["vllm"] / rates["hf"]
            results["demo_max_new_tokens"] = demo.max_new_tokens
        shutil.rmtree(prepared)
        results["batch"] = args.prompts
        results["max_new_tokens"] = args.tokens
        record(f"rollout {model}", results)


def prepared_run(config) -> Path:
    """A run folder holding `config`'s prepared prompts, copied for each timed rollout stage."""
    from rgsd_pipeline.recipe import freeze_or_check
    from stages.prepare import prepare

    prepared = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    freeze_or_check(prepared, config)
    prepare(prepared, None, [], [], None)
    return prepared


def timed_stage(prepared: Path, engine) -> tuple[int, int, float]:
    """(rollouts, response tokens, seconds) of the rollout stage on a copy of `prepared`, with `engine` built
    beforehand."""
    import polars as pl
    from common import GivenEngine, timed

    from rgsd_pipeline import steps
    from rgsd_pipeline.shards import read_stage
    from schemas import ROLLOUTS

    run = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    shutil.copytree(prepared, run, dirs_exist_ok=True)
    _, seconds = timed(lambda: steps.rollout(run, 0, GivenEngine(engine)))
    rollouts, tokens = read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().select(
        pl.len(), pl.col("response_token_ids").list.len().sum()).collect().row(0)
    shutil.rmtree(run)
    return rollouts, tokens, seconds


def demo_rollout(args) -> dict:
    """Tokens/s of the demo's rollout stage (configs/smollm2-cpu.yaml as it is) with each engine, built beforehand,
    and their ratio; the median of `--repeats` runs."""
    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.engines import Sampling, make_engine
    from rgsd_pipeline.models import resolve_model

    config = load_config(ROOT / "configs" / "smollm2-cpu.yaml", [])
    prepared = prepared_run(config)
    results = {}
    for kind in ("hf", "vllm"):
        engine = make_engine(kind, resolve_model(config.model), config.engine, config.model,
                             sampling=Sampling.of(config))
        rates = []
        for _ in range(args.repeats):
            results["prompts"], tokens, seconds = timed_stage(prepared, engine)
            rates.append(tokens / seconds)
        engine.close()
        results[f"{kind}_tokens_per_s"] = statistics.median(rates)
    shutil.rmtree(prepared)
    results["vllm_over_hf"] = results["vllm_tokens_per_s"] / results["hf_tokens_per_s"]
    results["hf_batch_size"] = config.engine.hf_batch_size
    return results


def settings_breakdown(path, config, prompts, seeds, args) -> dict:
    """vLLM tokens/s at the demo's sampling settings added one by one (interleaved, median of the repeats), and with
    the behaviour log-probs recorded too; each rate over the model's own distribution's."""
    from common import timed

    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.engines import Sampling, make_engine

    demo = dataclasses.replace(Sampling.of(load_config(ROOT / "configs" / "smollm2-cpu.yaml", [])),
                               max_new_tokens=args.tokens)
    steps = {"model_distribution": Sampling(max_new_tokens=args.tokens),
             "temperature": Sampling(temperature=demo.temperature, max_new_tokens=args.tokens),
             "temperature_top_p": Sampling(temperature=demo.temperature, top_p=demo.top_p, max_new_tokens=args.tokens),
             "demo": demo}
    rate = lambda out, s: sum(len(g.token_ids) for g in out) / s  # noqa: E731
    engine = make_engine("vllm", path, config.engine, config.model, sampling=demo)
    engine.generate(prompts[:2], seeds[:2], dataclasses.replace(demo, max_new_tokens=4))  # warm-up
    rates = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, settings in steps.items():
            rates[name].append(rate(*timed(lambda settings=settings: engine.generate(prompts, seeds, settings))))
    engine.close()
    recorded = dataclasses.replace(demo, behaviour_logprobs=True)
    engine = make_engine("vllm", path, config.engine, config.model, sampling=recorded)
    engine.generate(prompts[:2], seeds[:2], dataclasses.replace(recorded, max_new_tokens=4))  # warm-up
    rates["demo_with_behaviour_logprobs"] = [rate(*timed(lambda: engine.generate(prompts, seeds, recorded)))
                                             for _ in range(args.repeats)]
    engine.close()
    values = {f"{name}_tokens_per_s": statistics.median(r) for name, r in rates.items()}
    base = values["model_distribution_tokens_per_s"]
    values.update({f"{name}_over_model_distribution": values[f"{name}_tokens_per_s"] / base
                   for name in rates if name != "model_distribution"})
    return values


if __name__ == "__main__":  # vLLM starts its engine with spawn
    main()
