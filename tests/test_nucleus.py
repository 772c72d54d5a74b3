"""Top-p among the most likely tokens (engines/nucleus.py) against a float64 brute force and the engine's sort."""

import torch
from helpers import brute_force_nucleus

from rgsd_pipeline.engines import nucleus
from rgsd_pipeline.engines.base import Sampling
from rgsd_pipeline.engines.hf_engine import process_logits

VOCABULARY = 49152  # SmolLM2's: wide enough that a flat row's nucleus passes both candidate widths
# peaked rows end within 256 candidates, middling ones within 4096, flat ones need the sort
SCALES = [12.0, 8.0, 6.0, 4.0, 3.6, 2.0, 0.5]


def rows(seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales_B = torch.tensor(SCALES)
    return torch.randn(len(scales_B), VOCABULARY, generator=generator) * scales_B.unsqueeze(1)


def test_the_nucleus_cut_among_candidates_is_the_sorted_one_and_the_brute_force_one():
    logits_B_V = rows()
    top_p_B = torch.tensor([0.95, 0.9, 0.95, 0.8, 0.95, 0.95, 0.95])
    sorted_rows = []

    def whole(logits_R_V, top_p_R):
        sorted_rows.append(len(top_p_R))
        return nucleus.sorted_cut(logits_R_V, top_p_R)

    cut_B_V = nucleus.cut(logits_B_V.clone(), top_p_B, whole)
    assert torch.equal(cut_B_V, nucleus.sorted_cut(logits_B_V, top_p_B))
    assert sorted_rows == [2]  # the two flat rows alone went to the sort
    for row in range(len(SCALES)):
        assert torch.equal(cut_B_V[row].isfinite(), brute_force_nucleus(logits_B_V[row], float(top_p_B[row])))
    kept = cut_B_V.isfinite().sum(1)
    assert kept[0] < 256 < kept[4] < 4096 < kept[5]
    finite = cut_B_V.isfinite()
    assert torch.equal(cut_B_V[finite], logits_B_V[finite])  # the kept logits are untouched


def test_a_row_of_p_one_keeps_every_token():
    logits_B_V = rows(1)[:2]
    top_p_B = torch.tensor([1.0, 0.9])
    cut_B_V = nucleus.cut(logits_B_V.clone(), top_p_B, nucleus.sorted_cut)
    assert bool(cut_B_V[0].isfinite().all()) and not bool(cut_B_V[1].isfinite().all())
    assert bool(nucleus.sorted_cut(logits_B_V, top_p_B)[0].isfinite().all())


def test_hf_sampling_distribution_cuts_the_nucleus_after_penalty_and_temperature():
    logits_B_V = rows(2)
    history_B_T = torch.randint(0, VOCABULARY, (len(SCALES), 40), generator=torch.Generator().manual_seed(3))
    sampling = Sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.05)
    processed_B_V = process_logits(logits_B_V, history_B_T, sampling)
    penalised_B_V = process_logits(logits_B_V, history_B_T, Sampling(temperature=0.8, repetition_penalty=1.05))
    for row in range(len(SCALES)):
        assert torch.equal(processed_B_V[row].isfinite(), brute_force_nucleus(penalised_B_V[row], 0.95))
    finite = processed_B_V.isfinite()
    assert torch.equal(processed_B_V[finite], penalised_B_V[finite])
