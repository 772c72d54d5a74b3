"""The teacher as a service: score against a pool of OpenAI-compatible vLLM servers of the base model.

    engine:
      score_kind: server
      teacher_urls: [http://node1:8000/v1, http://node2:8000/v1]     # `rgsd-pipeline serve-teacher --run RUN` on each

Each sequence is one completions request with its token ids as the prompt, `prompt_logprobs=k` and
`max_tokens=1`: the server answers, for every position after the first, the actual token with its rank
and the k most likely tokens (vLLM's prompt log-probs are the model's own distribution, temperature 1).
Requests are spread over the URLs (sequence i starts on URL i mod n) with at most
`engine.teacher_concurrency` in flight per URL; a failed request (connection, timeout, 429, 5xx) is
retried with exponential backoff on the next URL, so one dead replica slows a run down without stopping
it. A request that still fails, or an answer that cannot be used, raises TeacherServerError naming the URL
and the sequence (the score step adds the shard and row). The tail is 1 - Σ top-k in float64, as for the
vLLM engine.

Before the first shard every URL is probed (`check_teacher`): a fixed conversation, tokenized here, must
come back with the same ids (and the server's own tokenizer, where it exposes /tokenize, must agree), and
where the teacher's weights are on this machine its log-probs of the probe must equal one local forward
pass within `engine.teacher_tolerance` nats on average: a server of another model (or another checkpoint
of this one) is refused before anything is written.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import numpy as np

from rgsd_pipeline.config import EngineConfig, ModelConfig
from rgsd_pipeline.engines.base import Engine, EngineError, Scores

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
PROBE = [{"role": "user", "content": "What does the heart do, and why does it beat faster during exercise?"},
         {"role": "assistant", "content": "The heart pumps blood around the body. During exercise the muscles need "
                                          "more oxygen, so it beats faster to deliver more blood to them."}]


class TeacherServerError(EngineError):
    """A teacher server failed or answered something unusable; the message names the URL and the sequence."""


def base_url(url: str) -> str:
    """http://host:port/v1 from http://host:port, http://host:port/ or http://host:port/v1/."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class ServerEngine(Engine):
    kind = "server"

    def __init__(self, model_path: Path, engine_config: EngineConfig, model_config: ModelConfig, max_logprobs: int = 0):
        if not engine_config.teacher_urls:
            raise TeacherServerError("engine.score_kind=server needs engine.teacher_urls (the servers' base URLs)")
        self.model_path = Path(model_path)
        self.urls = [base_url(u) for u in engine_config.teacher_urls]
        self.config = engine_config
        key = os.environ.get(engine_config.teacher_api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model_name = engine_config.teacher_model or self._served_model()
        self.notes = tuple(check_teacher(self, model_path, model_config))

    # ---------------------------------------------------------------- requests
    def _served_model(self) -> str:
        """The one model the first server serves (engine.teacher_model names it when there are several)."""
        import httpx

        url = self.urls[0]
        try:
            answer = httpx.get(f"{url}/models", headers=self.headers, timeout=self.config.teacher_timeout_s)
            answer.raise_for_status()
            names = [m["id"] for m in answer.json()["data"]]
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as err:
            raise TeacherServerError(f"teacher server {url}: cannot list its models ({err}); is it an "
                                     "OpenAI-compatible server (vllm serve) and reachable from here?") from None
        if len(names) != 1:
            raise TeacherServerError(f"teacher server {url} serves {names}; name one with engine.teacher_model")
        return names[0]

    async def _request(self, client, index: int, sequence: list[int], k: int, urls: list[str]) -> list:
        """The prompt log-probs of one sequence: [None, {id: {logprob, rank}}, ...], retried over the URLs."""
        import httpx

        body = {"model": self.model_name, "prompt": [int(t) for t in sequence], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": k}
        attempts = self.config.teacher_max_retries + 1
        for attempt in range(attempts):
            url = urls[(index + attempt) % len(urls)]
            try:
                answer = await client.post(f"{url}/completions", json=body, headers=self.headers)
            except httpx.HTTPError as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if answer.status_code == 200:
                    return self._prompt_logprobs(url, index, sequence, answer)
                problem = f"HTTP {answer.status_code}: {answer.text[:300]}"
                if answer.status_code not in RETRY_STATUS:
                    raise TeacherServerError(f"teacher server {url} refused sequence {index}: {problem}", index)
            if attempt + 1 < attempts:
                await asyncio.sleep(min(0.5 * 2 ** attempt, 8.0) * (1 + random.random() / 4))
        raise TeacherServerError(f"teacher server {url} failed on sequence {index} after {attempts} attempt(s) "
                                 f"across {len(urls)} URL(s): {problem}; rerun the stage when the servers are "
                                 "up (finished shards are kept)", index)

    def _prompt_logprobs(self, url: str, index: int, sequence: list[int], answer) -> list:
        try:
            choice = answer.json()["choices"][0]
            entries = choice["prompt_logprobs"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TeacherServerError(f"teacher server {url} answered sequence {index} without prompt_logprobs; it "
                                     "must be a vLLM OpenAI-compatible server", index) from None
        echoed = choice.get("prompt_token_ids")
        if entries is None or len(entries) != len(sequence) or (echoed is not None and list(echoed) != sequence):
            raise TeacherServerError(f"teacher server {url} answered sequence {index} with "
                                     f"{len(entries or [])} prompt positions for {len(sequence)} tokens sent", index)
        return entries

    async def _score_all(self, sequences: list[list[int]], k: int, on_done, urls: list[str]) -> list[list]:
        import httpx

        limit = self.config.teacher_concurrency * len(urls)
        gate = asyncio.Semaphore(limit)
        timeout = httpx.Timeout(self.config.teacher_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=limit)) as client:
            async def one(index):
                async with gate:
                    entries = await self._request(client, index, sequences[index], k, urls)
                on_done(index)
                return entries

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(sequences))]
            try:
                return await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()

    # ---------------------------------------------------------------- the engine interface
    def score(self, sequences: list[list[int]], prompt_lens: list[int], k: int, on_progress=None,
              urls: list[str] | None = None) -> list[Scores]:
        """As every engine's score(); `urls` restricts the requests to some of the servers (the probe's check)."""
        if k > 0 and any(len(s) < 2 for s in sequences):
            raise TeacherServerError("a scored sequence needs at least one prompt token and one response token")

        def done(index):
            if on_progress:
                on_progress(1, len(sequences[index]) - prompt_lens[index])

        answers = asyncio.run(self._score_all(sequences, k, done, urls or self.urls))
        return [self._scores(i, seq, prompt_len, entries, k)
                for i, (seq, prompt_len, entries) in enumerate(zip(sequences, prompt_lens, answers, strict=True))]

    def _scores(self, index: int, sequence: list[int], prompt_len: int, entries: list, k: int) -> Scores:
        positions = range(prompt_len, len(sequence))  # entry p holds the distribution that predicted token p
        topk_ids = np.empty((len(positions), k), dtype=np.int64)
        topk_values = np.empty((len(positions), k), dtype=np.float32)
        token_values = np.empty(len(positions), dtype=np.float32)
        for row, position in enumerate(positions):
            entry = entries[position] or {}
            ranked = sorted(((v["rank"], int(t), v["logprob"]) for t, v in entry.items() if v["rank"] <= k))
            actual = entry.get(str(sequence[position]))
            if len(ranked) < k or actual is None:
                raise TeacherServerError(f"teacher server answered sequence {index} position {position} with "
                                         f"{len(ranked)} of the top-{k} log-probs; start it with --max-logprobs {k} "
                                         "or more", index)
            topk_ids[row] = [t for _, t, _ in ranked[:k]]
            topk_values[row] = [v for _, _, v in ranked[:k]]
            token_values[row] = actual["logprob"]
        mass = np.exp(topk_values.astype(np.float64)).sum(-1)
        tail = np.log(np.clip(1.0 - mass, 0.0, None), where=mass < 1.0,
                      out=np.full(len(positions), -np.inf)).astype(np.float32)
        return Scores(topk_ids, topk_values, token_values, tail)


def check_teacher(engine: ServerEngine, model_path: Path, model_config: ModelConfig) -> list[str]:
    """Refuse servers that do not serve our teacher (see the module docstring); when every URL agrees, returns one
    line per URL with the probe's measured gap to the local forward pass (mean and max nats per token)."""
    import httpx
    import torch

    from rgsd_pipeline.models import load_tokenizer
    from rgsd_pipeline.render import chat_ids

    tokenizer = load_tokenizer(model_path, model_config.trust_remote_code)
    probe = tokenizer.apply_chat_template(PROBE, tokenize=True, return_dict=False)
    probe = [int(t) for t in (probe["input_ids"] if hasattr(probe, "keys") else probe)]
    start = min(len(chat_ids(tokenizer, PROBE[:1])), len(probe) - 1)  # the answer's tokens
    local = None
    if any(Path(model_path).glob("*.safetensors")):
        from rgsd_pipeline.models import load_model

        model = load_model(model_path, model_config.dtype, model_config.trust_remote_code,
                           model_config.allow_pickle_weights)
        with torch.inference_mode():
            logp = model(torch.tensor([probe])).logits[0].float().log_softmax(-1)
        local = logp[torch.arange(start - 1, len(probe) - 1), torch.tensor(probe[start:])].numpy()
        del model
    text = PROBE[1]["content"]
    report = []
    for url in engine.urls:
        served = engine.score([probe], [start], 1, urls=[url])[0].token_logprob_T
        try:  # vLLM's own tokenizer endpoint, at the server root; hosted endpoints may not have it
            answer = httpx.post(url[:-len("/v1")] + "/tokenize", headers=engine.headers, timeout=30,
                                json={"model": engine.model_name, "prompt": text, "add_special_tokens": False})
            theirs = answer.json().get("tokens") if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            theirs = None
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if theirs is not None and list(theirs) != list(ours):
            raise TeacherServerError(f"teacher server {url} tokenizes differently from {model_path} (the probe text "
                                     f"gives {theirs[:8]}... there, {ours[:8]}... here): it is not our teacher")
        if local is None:
            report.append(f"teacher server {url}: same tokenizer; no local weights to compare log-probs with")
            continue
        gap, largest = float(np.abs(served - local).mean()), float(np.abs(served - local).max())
        if gap > engine.config.teacher_tolerance:
            raise TeacherServerError(
                f"teacher server {url} is not serving {model_path}: its log-probs of a probe conversation differ "
                f"from a local forward pass by {gap:.3f} nats per token on average (max {largest:.3f}; "
                f"engine.teacher_tolerance is {engine.config.teacher_tolerance}). Serve the base model the run was "
                "prepared with, in its model.dtype (rgsd-pipeline serve-teacher --run RUN)")
        report.append(f"teacher server {url}: probe log-prob gap to a local {model_config.dtype} forward pass "
                      f"{gap:.2e} mean, {largest:.2e} max nats per token over {len(local)} tokens (tolerance "
                      f"{engine.config.teacher_tolerance})")
    return report
