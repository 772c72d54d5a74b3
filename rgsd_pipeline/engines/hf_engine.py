"""The transformers engine: batched sampling with a KV cache and per-sequence seeds, and chunked scoring.

Sampling uses one torch.Generator per sequence, seeded from the sequence's own seed, so a prompt's
tokens do not depend on which other prompts share its batch: a resumed or re-sharded run samples
the same tokens. Batches are length-bucketed (sorted by prompt length) and left-padded.

Scoring runs the decoder once per batch and applies the LM head and an fp32 log-softmax to chunks of
positions, so a 150k vocabulary never materialises [batch, T, V] at once.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from rgsd_pipeline.config import EngineConfig, ModelConfig
from rgsd_pipeline.engines import nucleus
from rgsd_pipeline.engines.base import Engine, Generation, Sampling, Scores
from rgsd_pipeline.guidance import guided_logprobs
from rgsd_pipeline.models import eos_token_ids, load_model, load_tokenizer, pad_token_id


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids_B_T = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_B_T = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids_B_T[row, width - len(seq):] = torch.tensor(seq)
        mask_B_T[row, width - len(seq):] = 1
    return ids_B_T, mask_B_T


def process_logits(logits_B_V: torch.Tensor, history_B_T: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Sampling distribution logits: repetition penalty, temperature, top-k, top-p (as transformers applies them)."""
    logits_B_V = logits_B_V.clone()
    if sampling.repetition_penalty != 1.0:
        seen_B_T = logits_B_V.gather(1, history_B_T)
        penalty = sampling.repetition_penalty
        seen_B_T = torch.where(seen_B_T > 0, seen_B_T / penalty, seen_B_T * penalty)
        logits_B_V.scatter_(1, history_B_T, seen_B_T)
    logits_B_V = logits_B_V / max(sampling.temperature, 1e-6)
    if sampling.top_k > 0:
        kth_B_1 = logits_B_V.topk(min(sampling.top_k, logits_B_V.shape[-1]), dim=-1).values[:, -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth_B_1, -float("inf"))
    if sampling.top_p < 1.0:  # among the most likely tokens first, not by sorting the vocabulary (engines.nucleus)
        top_p_B = torch.full(logits_B_V.shape[:1], sampling.top_p, dtype=logits_B_V.dtype, device=logits_B_V.device)
        logits_B_V = nucleus.cut(logits_B_V, top_p_B, whole=nucleus.sorted_cut)
    return logits_B_V


class HfEngine(Engine):
    kind = "hf"

    def __init__(self, model_path: Path, engine_config: EngineConfig, model_config: ModelConfig):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, model_config.dtype, model_config.trust_remote_code,
                                model_config.allow_pickle_weights).eval().to(self.device)
        self.tokenizer = load_tokenizer(model_path, model_config.trust_remote_code)
        self.model_path = Path(model_path)
        self.batch_size = engine_config.hf_batch_size
        self.max_model_len = model_config.max_model_len
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer, self.eos_ids)
        # The prompt's pass needs the last position's logits alone: [batch, prompt, vocabulary] in fp32 would be
        # 3.2 GB for 16 prompts of 1,024 tokens and SmolLM2's vocabulary (a model whose code cannot be told computes
        # them all).
        self.last_logits = ({"logits_to_keep": 1}
                            if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {})

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
                 on_progress=None, contrast=None) -> list[Generation]:
        results: list[Generation | None] = [None] * len(prompts)
        for batch in length_buckets([len(p) for p in prompts], self.batch_size):
            negatives = None if contrast is None else [contrast.sequences[i] for i in batch]
            for index, generation in zip(batch, self._generate_batch([prompts[i] for i in batch],
                                                                     [seeds[i] for i in batch], sampling,
                                                                     negatives, contrast and contrast.scale),
                                         strict=True):
                results[index] = generation
                if on_progress:
                    on_progress(1, len(generation.token_ids))
        return results

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
                        negatives: list[list[int]] | None = None, scale: float = 0.0) -> list[Generation]:
        """One batch's samples; with `negatives` (rubric guidance: rgsd_pipeline/guidance.py), each row's negative
        prompt runs in the same batch, fed the same tokens, and the row samples from the guided distribution."""
        batch = len(prompts)
        ids_B_T, mask_B_T = (t.to(self.device) for t in left_pad(prompts + (negatives or []), self.pad_id))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        budget = min(sampling.max_new_tokens, self.max_model_len - ids_B_T.shape[1])
        tokens, raw, behaviour = ([[] for _ in range(batch)] for _ in range(3))
        finished = [False] * batch
        finish = ["length"] * batch
        # The tokens the repetition penalty counts: a row's own, never its left padding (which would penalise the
        # pad id in rows batched with longer prompts): padding repeats the row's last prompt token instead.
        history_B_T = torch.where(mask_B_T[:batch].bool(), ids_B_T[:batch], ids_B_T[:batch, -1:])
        # Left padding: a row's positions count its own tokens only, so padding does not shift them.
        position_B_T = (mask_B_T.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids_B_T, attention_mask=mask_B_T, position_ids=position_B_T, use_cache=True,
                         **self.last_logits)
        for _ in range(max(budget, 0)):
            # 1. The next-token distributions: the model's own (raw) and the one sampled from (processed).
            raw_B_V = out.logits[:, -1, :].float()
            if negatives is not None:  # the guided distribution is what this row's model now is
                raw_B_V = guided_logprobs(raw_B_V[:batch].log_softmax(-1), raw_B_V[batch:].log_softmax(-1), scale)
            sample_logits_B_V = process_logits(raw_B_V, history_B_T, sampling)
            raw_B_V = raw_B_V.log_softmax(-1).cpu()
            sample_B_V = sample_logits_B_V.log_softmax(-1).cpu()
            # 2. Draw each row with its own generator, so its tokens do not depend on the rest of the batch.
            next_B = torch.tensor([self.pad_id if finished[row] else
                                   int(torch.multinomial(sample_B_V[row].exp(), 1, generator=generators[row]))
                                   for row in range(batch)])
            # 3. Record the token and both log-probs; a row that emits an end-of-sequence id is done.
            for row in range(batch):
                if finished[row]:
                    continue
                token = int(next_B[row])
                tokens[row].append(token)
                raw[row].append(float(raw_B_V[row, token]))
                behaviour[row].append(float(sample_B_V[row, token]))
                if token in self.eos_ids:
                    finished[row], finish[row] = True, "stop"
            if all(finished):
                break
            # 4. One decoding step for every row (finished rows feed padding and are ignored); a negative row is fed
            #    its positive row's token.
            next_B = next_B.to(self.device)
            history_B_T = torch.cat([history_B_T, next_B[:, None]], dim=1)
            fed_B = next_B if negatives is None else torch.cat([next_B, next_B])
            mask_B_T = torch.cat([mask_B_T, torch.ones(len(fed_B), 1, dtype=torch.long, device=self.device)], dim=1)
            position_B_T = position_B_T[:, -1:] + 1
            out = self.model(input_ids=fed_B[:, None], attention_mask=mask_B_T, position_ids=position_B_T,
                             past_key_values=out.past_key_values, use_cache=True)
        keep = sampling.records_behaviour
        return [Generation(tokens[r], raw[r], behaviour[r] if keep else None, finish[r]) for r in range(batch)]

    def _response_logprobs(self, sequences: list[list[int]], prompt_lens: list[int], chunk_positions: int,
                           contrast=None):
        """Yield (index, lo, logp_C_V, targets_C): fp32 log-softmax over chunks of each sequence's response positions.

        The logits at position p predict token p + 1, so response token j is predicted at prompt_len + j - 1. With
        `contrast` (guidance.Contrast: the same responses after other prompts), each chunk is the guided
        distribution of the two passes, combined in fp32 over the whole vocabulary, and its item is (index, lo,
        logp_C_V, targets_C, rubric_C_V, negative_C_V).
        """
        head = self.model.get_output_embeddings()
        for batch in length_buckets([len(s) for s in sequences], self.batch_size):
            groups = [(sequences, prompt_lens)] + ([(contrast.sequences, contrast.prompt_lens)] if contrast else [])
            hidden, starts, inputs = [], [], []
            for group, lens in groups:
                ids_B_T, mask_B_T = (t.to(self.device) for t in left_pad([group[i] for i in batch], self.pad_id))
                position_B_T = (mask_B_T.cumsum(-1) - 1).clamp(min=0)
                hidden.append(self.model.get_decoder()(input_ids=ids_B_T, attention_mask=mask_B_T,
                                                       position_ids=position_B_T).last_hidden_state)
                starts.append([ids_B_T.shape[1] - len(group[i]) + lens[i] - 1 for i in batch])
                inputs.append(ids_B_T)
            targets_ids_B_T = inputs[0]  # the rubric pass's row: its responses are the same tokens
            for row, index in enumerate(batch):
                first = starts[0][row]
                last = targets_ids_B_T.shape[1] - 1
                for lo in range(first, last, chunk_positions):
                    hi = min(lo + chunk_positions, last)
                    logp_C_V = head(hidden[0][row, lo:hi]).float().log_softmax(-1)
                    targets_C = targets_ids_B_T[row, lo + 1:hi + 1]
                    if contrast is None:
                        yield index, lo - first, logp_C_V, targets_C
                        continue
                    other = starts[1][row] + (lo - first)
                    negative_C_V = head(hidden[1][row, other:other + hi - lo]).float().log_softmax(-1)
                    yield (index, lo - first, guided_logprobs(logp_C_V, negative_C_V, contrast.scale), targets_C,
                           logp_C_V, negative_C_V)

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], prompt_lens: list[int], k: int, on_progress=None,
              chunk_positions: int = 256) -> list[Scores]:
        return self._score(sequences, prompt_lens, k, on_progress, chunk_positions)

    @torch.inference_mode()
    def score_guided(self, sequences: list[list[int]], prompt_lens: list[int], contrast, k: int, candidates: int = 0,
                     on_progress=None, chunk_positions: int = 256) -> list[Scores]:
        """As score(), for the guided distribution (rgsd_pipeline/guidance.py), exactly: both passes' full-vocabulary
        fp32 log-softmax at every position. `candidates` is for engines that see only top-k lists."""
        return self._score(sequences, prompt_lens, k, on_progress, chunk_positions, contrast)

    def _score(self, sequences, prompt_lens, k, on_progress, chunk_positions, contrast=None) -> list[Scores]:
        parts: dict[int, list] = {i: [] for i in range(len(sequences))}
        for index, _, logp_C_V, targets_C, *passes in self._response_logprobs(sequences, prompt_lens, chunk_positions,
                                                                             contrast):
            top = logp_C_V.topk(k, dim=-1)
            # The tail is summed over the entries outside the top-k in fp32, not taken as 1 - their mass,
            # which loses every digit when the top-k hold all but 1e-7 of it.
            tail_C = logp_C_V.scatter(-1, top.indices, -float("inf")).logsumexp(-1)
            token_C = logp_C_V.gather(1, targets_C[:, None])[:, 0]
            both = [p.gather(1, targets_C[:, None])[:, 0].cpu() for p in passes]
            parts[index].append((top.indices.cpu(), top.values.cpu(), token_C.cpu(), tail_C.cpu(), *both))
        results = []
        for index in range(len(sequences)):
            chunks = parts[index]
            empty = [np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32),
                     np.zeros(0, np.float32)] + [np.zeros(0, np.float32)] * (0 if contrast is None else 2)
            joined = [torch.cat([c[i] for c in chunks]).numpy() for i in range(len(empty))] if chunks else empty
            results.append(Scores(*joined))
            if on_progress:
                on_progress(1, len(sequences[index]) - prompt_lens[index])
        return results

    @torch.inference_mode()
    def logprobs_at(self, sequences: list[list[int]], prompt_lens: list[int], ids_T_K: list[np.ndarray],
                    chunk_positions: int = 256) -> list[np.ndarray]:
        """This model's fp32 log-probs of the given ids [T, K] at each response position of each sequence."""
        out = [np.zeros(ids.shape, np.float32) for ids in ids_T_K]
        for index, lo, logp_C_V, _ in self._response_logprobs(sequences, prompt_lens, chunk_positions):
            ids_C_K = torch.from_numpy(ids_T_K[index][lo:lo + logp_C_V.shape[0]]).long().to(self.device)
            out[index][lo:lo + logp_C_V.shape[0]] = logp_C_V.gather(1, ids_C_K).cpu().numpy()
        return out

    in_process = True  # new weights can be handed over as tensors

    @torch.no_grad()
    def load_weights(self, model_path: Path, weights: dict | None = None) -> None:
        """Take another checkpoint's weights in place (same architecture); tied weights follow their source.
        `weights`, when given, are that checkpoint's tensors already in memory: the folder is not read."""
        from safetensors.torch import load_file

        state = dict(weights) if weights is not None else {}
        for file in sorted(Path(model_path).glob("*.safetensors")) if weights is None else ():
            state.update(load_file(file))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "all_tied_weights_keys", {}))
        absent = sorted(set(missing) - tied)
        if unexpected or absent:
            raise ValueError(f"{model_path} does not fit the engine's model: missing {absent[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.model_path = Path(model_path)

    def close(self) -> None:
        del self.model
