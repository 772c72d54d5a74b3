"""vLLM's CPU sampler without its two full-vocabulary passes per step: top-p without sorting the vocabulary, and a
repetition penalty that touches only the tokens already seen.

On a CPU, vLLM (without Triton) applies top-p by sorting every row of the logits, softmax and cumulative sum over
the whole sorted vocabulary, then scattering the row back: 30 ms per step for 16 rows of SmolLM2's 49,152 tokens on
this 2-core machine, about a quarter of the step. Its repetition penalty builds a (rows, vocabulary) count of the
prompt's and the response's tokens, and a penalty for every entry, at every step: another 10 ms. Both are
replaced here, in the process that runs vLLM's sampler (`install`, called where the worker imports
`engines.vllm_worker`), on CPUs only; on GPUs vLLM's own kernels stay.

- **Top-p** is cut among the most likely tokens (`engines.nucleus`); a row whose nucleus is wider than 4096 tokens
  goes to vLLM's own function. The kept set is vLLM's, and top-k, when set, is applied first.
- **The repetition penalty** scales the logits of the tokens in the prompt or the response, gathered and scattered
  back, with the same float32 arithmetic as vLLM's: equal bits. Frequency and presence penalties, which this
  project never sets, go to vLLM's function.

The draw itself is vLLM's (Gumbel-max with per-request seeds), so a request's tokens still depend only on its
seed: a rerun of a shard samples the same tokens. `RGSD_VLLM_SAMPLER=vllm` keeps vLLM's sampler as it is.
"""

from __future__ import annotations

import os

ENV = "RGSD_VLLM_SAMPLER"


def top_k_top_p(logits_B_V, top_k_B, top_p_B, fallback):
    """vLLM's `apply_top_k_top_p` without sorting the vocabulary: the logits with every token outside the top-k
    and the top-p nucleus set to -inf (in place, and returned). `fallback` is vLLM's function, given the rows whose
    nucleus reaches beyond the candidates, and every call without top-p."""
    from rgsd_pipeline.engines import nucleus

    if top_p_B is None:
        return fallback(logits_B_V, top_k_B, top_p_B)  # vLLM's top-k alone sorts nothing on a CPU
    if top_k_B is not None:
        logits_B_V = fallback(logits_B_V, top_k_B, None)
    return nucleus.cut(logits_B_V, top_p_B, whole=lambda logits_R_V, top_p_R: fallback(logits_R_V, None, top_p_R))


def penalties(logits_B_V, prompt_tokens_B_P, output_tokens_B_O, presence_B, frequency_B, repetition_B, fallback):
    """vLLM's `apply_penalties` (in place, and returned) when only the repetition penalty is set: each token seen in
    the prompt or the response has its logit divided by the penalty when positive, multiplied when not. Token id V
    pads both tensors. `fallback` is vLLM's function, for frequency and presence penalties."""
    import torch

    if bool(presence_B.any()) or bool(frequency_B.any()):
        return fallback(logits_B_V, prompt_tokens_B_P, output_tokens_B_O, presence_B, frequency_B, repetition_B)
    vocabulary = logits_B_V.shape[1]
    seen_B_S = torch.cat([prompt_tokens_B_P, output_tokens_B_O.to(prompt_tokens_B_P.device)], dim=1)
    # padding points at the row's first prompt token, penalised anyway: both writes carry the same value
    seen_B_S = torch.where(seen_B_S >= vocabulary, seen_B_S[:, :1], seen_B_S)
    values_B_S = logits_B_V.gather(1, seen_B_S)
    penalty_B_1 = repetition_B.unsqueeze(1)
    scaled_B_S = torch.where(values_B_S > 0, values_B_S * (1.0 / penalty_B_1), values_B_S * penalty_B_1)
    return logits_B_V.scatter_(1, seen_B_S, scaled_B_S)


def install() -> bool:
    """Put these functions in place of vLLM's in this process, on a CPU unless `RGSD_VLLM_SAMPLER=vllm`; whether
    they are in place. Idempotent."""
    from vllm.platforms import current_platform

    if os.environ.get(ENV, "ours") == "vllm" or not current_platform.is_cpu():
        return False
    import functools

    from vllm.v1.sample.ops import penalties as vllm_penalties
    from vllm.v1.sample.ops import topk_topp_sampler as vllm_top_p

    if installed():
        return True
    replaced_top_p = functools.partial(top_k_top_p, fallback=vllm_top_p.apply_top_k_top_p)
    replaced_penalties = functools.partial(penalties, fallback=vllm_penalties.apply_penalties)
    replaced_top_p.rgsd = replaced_penalties.rgsd = True
    vllm_top_p.apply_top_k_top_p = replaced_top_p
    vllm_penalties.apply_penalties = replaced_penalties
    return True


def installed() -> bool:
    """Whether this process's vLLM samples with these functions."""
    from vllm.v1.sample.ops import penalties as vllm_penalties
    from vllm.v1.sample.ops import topk_topp_sampler as vllm_top_p

    return all(getattr(function, "rgsd", False)
               for function in (vllm_top_p.apply_top_k_top_p, vllm_penalties.apply_penalties))
