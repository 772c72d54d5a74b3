"""The CPU sampler put in place of vLLM's (engines/vllm_sampling.py) against vLLM's own functions and a brute-force
nucleus in float64."""

import pytest
import torch
from helpers import brute_force_nucleus

vllm_top_p = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler", reason="needs vllm (make setup)")
from vllm.model_executor.layers.utils import apply_penalties as vllm_penalties  # noqa: E402

from rgsd_pipeline.engines.vllm_sampling import penalties, top_k_top_p  # noqa: E402

pytestmark = pytest.mark.vllm
VOCABULARY = 49152  # SmolLM2's: wide enough that a flat row's nucleus passes both candidate widths


@pytest.mark.parametrize("with_top_k", [False, True])
def test_top_p_keeps_vllms_nucleus_without_sorting_the_vocabulary(with_top_k):
    generator = torch.Generator().manual_seed(0)
    # peaked rows end within 256 candidates, middling ones within 4096, flat ones need vLLM's sort
    scales_B = torch.tensor([12.0, 8.0, 6.0, 4.0, 3.6, 2.0, 0.5, 8.0])
    logits_B_V = torch.randn(len(scales_B), VOCABULARY, generator=generator) * scales_B.unsqueeze(1)
    top_p_B = torch.tensor([0.95, 0.9, 0.95, 0.8, 0.95, 0.95, 0.95, 1.0])
    top_k_B = torch.tensor([50, 5, 400, 3000, 49152, 20, 7, 100]) if with_top_k else None
    sorted_calls = []

    def vllms(logits, k, p):
        sorted_calls.append(p is not None and len(p))
        return vllm_top_p.apply_top_k_top_p(logits, k, p)

    ours_B_V = top_k_top_p(logits_B_V.clone(), top_k_B, top_p_B, fallback=vllms)
    assert torch.equal(ours_B_V, vllm_top_p.apply_top_k_top_p(logits_B_V.clone(), top_k_B, top_p_B))
    if not with_top_k:
        assert sorted_calls == [3]  # the two flat rows and the row of p = 1 alone went to the sort
        for row in range(len(scales_B) - 1):
            assert torch.equal(ours_B_V[row].isfinite(), brute_force_nucleus(logits_B_V[row], float(top_p_B[row])))
        kept = ours_B_V.isfinite().sum(1)
        assert kept[0] < 256 < kept[4] < 4096 < kept[5] and kept[7] == VOCABULARY


def test_top_p_keeps_the_token_that_crosses_p():
    logits_1_V = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_k_top_p(logits_1_V, None, torch.tensor([0.6]), fallback=vllm_top_p.apply_top_k_top_p).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_repetition_penalty_gives_vllms_bits_from_the_seen_tokens_alone():
    generator = torch.Generator().manual_seed(1)
    rows, vocabulary = 6, 1000
    logits_B_V = torch.randn(rows, vocabulary, generator=generator) * 4
    prompt_B_P = torch.randint(0, vocabulary, (rows, 30), generator=generator)
    output_B_O = torch.randint(0, vocabulary, (rows, 12), generator=generator)
    prompt_B_P[2, 5:] = vocabulary  # padding, as vLLM pads: token id V
    output_B_O[3, :] = vocabulary  # nothing generated yet
    output_B_O[4, 1:] = output_B_O[4, 0]  # one token repeated
    zeros_B = torch.zeros(rows)
    repetition_B = torch.tensor([1.05, 1.3, 1.0, 2.0, 1.1, 0.9])
    expected = vllm_penalties(logits_B_V.clone(), prompt_B_P, output_B_O, zeros_B, zeros_B, repetition_B)
    ours = penalties(logits_B_V.clone(), prompt_B_P, output_B_O, zeros_B, zeros_B, repetition_B,
                     fallback=vllm_penalties)
    assert torch.equal(ours, expected) and not torch.equal(ours, logits_B_V)
    frequency_B = torch.full((rows,), 0.2)  # not handled here: vLLM's function computes it
    assert torch.equal(penalties(logits_B_V.clone(), prompt_B_P, output_B_O, zeros_B, frequency_B, repetition_B,
                                 fallback=vllm_penalties),
                       vllm_penalties(logits_B_V.clone(), prompt_B_P, output_B_O, zeros_B, frequency_B, repetition_B))
