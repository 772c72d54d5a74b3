"""Losses against brute-force full-distribution references (float64, written independently)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rgsd_pipeline.distill import LossSpec, Targets, distill_loss
from rgsd_pipeline.losses import (
    distill_per_token,
    importance_weights,
    log1mexp,
    position_weights,
    sampled_reverse_kl,
    student_buckets,
    teacher_buckets,
    temper,
    with_tail,
)
from rgsd_pipeline.signals import decode_logprobs, encode_logprobs

torch.manual_seed(0)
N, V = 6, 11


def reference_divergence(p, q, beta):
    """Generalized JSD of probability rows p (teacher) and q (student), straight from the definition."""
    def kl(a, b):
        return (a * (a / b).log()).nan_to_num(0.0).sum(-1)
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def sorted_full_topk(teacher_logp):
    """The teacher's "top-k" with k = V: every token, best first."""
    values, ids = teacher_logp.sort(dim=-1, descending=True)
    return ids, values


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_with_k_equal_v_the_bucket_loss_is_the_full_vocabulary_loss_and_gradient(beta):
    teacher_logp = torch.randn(N, V, dtype=torch.float64).log_softmax(-1)
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    ids, values = sorted_full_topk(teacher_logp)
    ours, _, _ = distill_per_token(student_buckets(logits.log_softmax(-1), ids), with_tail(values), beta)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)

    reference = reference_divergence(teacher_logp.exp(), logits.softmax(-1), beta)
    (grad_reference,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_plus_tail_equals_the_divergence_of_the_lumped_distributions(beta):
    k = 4
    teacher_logp = torch.randn(N, V, dtype=torch.float64).log_softmax(-1)
    student_logp = torch.randn(N, V, dtype=torch.float64).log_softmax(-1)
    values, ids = teacher_logp.topk(k, dim=-1)
    ours, _, _ = distill_per_token(student_buckets(student_logp, ids), with_tail(values), beta)
    p, q = teacher_logp.exp(), student_logp.exp()
    lumped_p = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    lumped_q = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(ours, reference_divergence(lumped_p, lumped_q, beta), atol=1e-10, rtol=1e-8)


def clipped_full_vocabulary(clip: str):
    """A random teacher and student logits over the whole vocabulary (K = V), and their JSD(0.5) clipped at 0.05."""
    teacher = torch.randn(N, V, dtype=torch.float64).log_softmax(-1)
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    ids, values = sorted_full_topk(teacher)
    return teacher, logits, *distill_per_token(student_buckets(logits.log_softmax(-1), ids), with_tail(values), 0.5,
                                               clip=clip, tau=0.05)


def test_token_clip_caps_the_loss_and_stops_the_gradient_above_tau():
    _, logits, loss, divergence, clipped = clipped_full_vocabulary("token")
    torch.testing.assert_close(loss, divergence.clamp(max=0.05))
    assert clipped.tolist() == (divergence > 0.05).tolist() and clipped.any()
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert (grad[clipped] == 0).all() and (grad[~clipped] != 0).any() if (~clipped).any() else True


def test_entry_clip_caps_each_top_k_term_and_leaves_the_tail_alone():
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]], dtype=torch.float64).log()
    logits = torch.tensor([[0.1, 0.2, 0.7], [0.7, 0.2, 0.1]], dtype=torch.float64).log().requires_grad_(True)
    loss, divergence, clipped = distill_per_token(logits.log_softmax(-1), teacher, 0.0, clip="entry", tau=0.05)
    terms = teacher.exp() * (teacher - logits.log_softmax(-1))  # forward KL terms, the last bucket the tail
    torch.testing.assert_close(loss, terms[:, :2].clamp(max=0.05).sum(-1) + terms[:, 2])
    torch.testing.assert_close(divergence, terms.sum(-1).detach())
    assert clipped.tolist() == [True, False]  # row 2's only term above tau is its tail's
    # Row 1 loses the gradient of its clipped first entry only; row 2 keeps all of it, its tail's included.
    grad = lambda value: torch.autograd.grad(value, logits, retain_graph=True)[0]  # noqa: E731
    torch.testing.assert_close(grad(loss[0]), grad(terms[0, 1:].sum()))
    torch.testing.assert_close(grad(loss[1]), grad(terms[1].sum()))
    assert grad(loss[1]).abs().sum() > 0


def test_soft_clip_bounds_the_value_and_scales_the_gradient_of_positions_above_tau():
    teacher, logits, loss, _, clipped = clipped_full_vocabulary("soft")
    reference = reference_divergence(teacher.exp(), logits.softmax(-1), 0.5)
    torch.testing.assert_close(loss, reference.clamp(max=0.05), atol=1e-10, rtol=1e-8)
    assert clipped.tolist() == (reference > 0.05).tolist() and clipped.any()
    for row in range(N):  # every position keeps a gradient: the full one below tau, scaled by tau / D above
        (grad,) = torch.autograd.grad(loss[row], logits, retain_graph=True)
        (full,) = torch.autograd.grad(reference[row], logits, retain_graph=True)
        scale = min(1.0, 0.05 / reference[row].item())
        torch.testing.assert_close(grad, full * scale, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("kind", ["jsd", "forward", "reverse"])
def test_student_equal_to_teacher_gives_zero_loss_and_gradient_at_any_temperature(temperature, kind):
    """The teacher's signals are the student's own top-k and exact tail: nothing should pull the student."""
    hidden_size, k, positions = 8, 4, 9
    head = torch.nn.Linear(hidden_size, V, bias=False).double()
    hidden = torch.randn(positions, hidden_size, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        own = head(hidden).log_softmax(-1)
    top = own.topk(k, dim=-1)
    tail = own.scatter(-1, top.indices, -float("inf")).logsumexp(-1)
    tokens = torch.randint(0, V, (positions,))
    targets = Targets(top.indices, top.values, tail, own.gather(-1, tokens[:, None])[:, 0],
                      own.gather(-1, tokens[:, None])[:, 0], tokens, torch.full((positions,), 1 / positions,
                                                                                 dtype=torch.float64))
    beta = {"jsd": 0.5, "forward": 0.0, "reverse": 1.0}[kind]
    loss, _, _ = distill_loss(hidden, head, targets, LossSpec(beta=beta, clip="none", temperature=temperature))
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    # The loss computes logits in fp32, so "zero" is fp32 rounding (a mismatch gives 0.03-0.06 per position).
    assert abs(loss.item()) < 1e-7
    for grad in grads:
        assert grad.abs().max() < 1e-6


def test_temper_is_the_same_bucket_operation_as_a_tempered_softmax_of_lumped_mass():
    """Tempering K + 1 buckets = softmax(log p / T) over the buckets, computed independently."""
    buckets = torch.tensor([[0.6, 0.25, 0.1, 0.05]], dtype=torch.float64)
    expected = buckets ** 0.5 / (buckets ** 0.5).sum(-1, keepdim=True)
    torch.testing.assert_close(temper(buckets.log(), 2.0).exp(), expected)


def test_decoded_top_k_plus_the_stored_tail_sums_to_one():
    """uint8 codes push a peaked top-k above mass 1; the stored exact tail decides and the top-k are rescaled."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 2000, generator=generator, dtype=torch.float64) * 6  # sharp distributions
    logp = logits.log_softmax(-1)
    top = logp.topk(20, dim=-1)
    tail = logp.scatter(-1, top.indices, -float("inf")).logsumexp(-1)
    decoded = torch.from_numpy(decode_logprobs(encode_logprobs(top.values.float().numpy(), pa.uint8())))
    assert (decoded.double().exp().sum(-1) > 1).any()  # the rounding this fixes
    buckets = teacher_buckets(decoded, tail.float())
    torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(400, dtype=torch.float32), atol=1e-3, rtol=0)
    torch.testing.assert_close(buckets[:, -1].double(), tail.clamp(min=np.log(1e-13)), atol=1e-5, rtol=1e-5)


def test_importance_weights_equal_a_by_hand_computation():
    student = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    behaviour = torch.tensor([-1.5, -1.0, -0.5, -4.0])
    # exp(0.5)=1.6487, exp(-1)=0.3679, exp(0)=1, exp(1)=2.718 -> capped at 2
    torch.testing.assert_close(importance_weights(student, behaviour, 2.0),
                               torch.tensor([1.6487213, 0.3678794, 1.0, 2.0]))
    assert torch.equal(importance_weights(student, behaviour, 0.0), torch.ones(4))
    assert not importance_weights(student.requires_grad_(), behaviour, 2.0).requires_grad


def test_sampled_reverse_kl_gradient_is_the_reverse_kl_gradient_in_expectation():
    teacher = torch.randn(V, dtype=torch.float64).log_softmax(-1)
    logits = torch.randn(V, dtype=torch.float64, requires_grad=True)
    q = logits.softmax(-1)
    # Exact expectation over the student's samples y ~ q of the estimator's gradient.
    logq = logits.log_softmax(-1)
    expected_loss = (q.detach() * sampled_reverse_kl(logq, teacher)).sum()
    (grad_estimator,) = torch.autograd.grad(expected_loss, logits)
    (grad_reverse_kl,) = torch.autograd.grad(reference_divergence(teacher.exp(), logits.softmax(-1), 1.0), logits)
    torch.testing.assert_close(grad_estimator, grad_reverse_kl)


def test_position_weights():
    sequence = torch.tensor([0, 0, 0, 1, 2, 2])
    loss = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 6.0])
    assert float((position_weights(sequence, "token", 6, 3) * loss).sum()) == pytest.approx(26 / 6)
    assert float((position_weights(sequence, "sequence", 6, 3) * loss).sum()) == pytest.approx((2 + 10 + 5) / 3)
    # Dr. GRPO's constant normaliser: the batch's sum over (sequences x the longest response allowed), the same
    # weight for every token however long its answer.
    assert float((position_weights(sequence, "constant", 6, 3, 16) * loss).sum()) == pytest.approx(26 / (3 * 16))
    halves = [position_weights(sequence[part], "constant", 6, 3, 16) for part in (slice(0, 3), slice(3, 6))]
    assert torch.equal(torch.cat(halves), position_weights(sequence, "constant", 6, 3, 16))  # micro-batches add up
    with pytest.raises(ValueError, match="max_new_tokens"):
        position_weights(sequence, "constant", 6, 3)


def test_log1mexp_is_accurate_at_both_ends():
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    points = [-1e-12, -0.1, -0.7, -5.0, -50.0]
    exact = [float((1 - Decimal(x).exp()).ln()) for x in points]
    torch.testing.assert_close(log1mexp(torch.tensor(points, dtype=torch.float64)),
                               torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=0)
    assert log1mexp(torch.tensor([0.0])).item() == -float("inf")


@pytest.mark.parametrize("spec", [LossSpec(), LossSpec(clip="none", temperature=2.0, ce_weight=0.3),
                                  LossSpec(kind="sampled_reverse_kl"), LossSpec(beta=0.0, clip="token"),
                                  LossSpec(clip="soft")])
def test_chunked_loss_equals_the_unchunked_loss_and_gradients(spec):
    hidden_size, k, positions = 8, 5, 13
    head = torch.nn.Linear(hidden_size, V, bias=False).double()
    hidden = torch.randn(positions, hidden_size, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(positions, V, dtype=torch.float64).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    tail = teacher.scatter(-1, top.indices, -float("inf")).logsumexp(-1)
    tokens = torch.randint(0, V, (positions,))
    targets = Targets(top.indices, top.values, tail, teacher.gather(-1, tokens[:, None])[:, 0],
                      torch.randn(positions, dtype=torch.float64) - 2, tokens,
                      torch.full((positions,), 1 / positions, dtype=torch.float64))
    results = []
    for chunk in (1, 4, positions):
        loss, stats, student_token = distill_loss(hidden, head, targets, spec, chunk_positions=chunk)
        grads = torch.autograd.grad(loss, [hidden, head.weight])
        results.append((loss.detach(), stats, grads))
        own = torch.nn.functional.linear(hidden, head.weight).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(student_token, own.detach())  # the sampled tokens' log-probs, in position order
    for loss, stats, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(stats, results[0][1])
        for a, b in zip(grads, results[0][2], strict=True):
            torch.testing.assert_close(a, b)


def test_the_lm_head_and_loss_run_in_fp32_under_bf16_autocast():
    """Under train.bf16 only the decoder is autocast: the loss's logits are the fp32 product of the fp32 hidden states
    and head, as a float64 reference computes them (bf16 logits at scale 10 moved top-k log-probs by ~0.03 nats)."""
    torch.manual_seed(0)
    hidden_size, k, positions, vocab = 64, 20, 32, 512
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.mul_(10.0)  # logits of scale ~10, as a trained model's
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    teacher = torch.randn(positions, vocab, dtype=torch.float64).mul(3).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    tail = teacher.scatter(-1, top.indices, -float("inf")).logsumexp(-1)
    tokens = torch.randint(0, vocab, (positions,))
    targets = Targets(top.indices, top.values.float(), tail.float(),
                      teacher.gather(-1, tokens[:, None])[:, 0].float(), None, tokens,
                      torch.full((positions,), 1 / positions))
    spec = LossSpec(clip="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss, _, _ = distill_loss(hidden, head, targets, spec)
    reference_head = torch.nn.Linear(hidden_size, vocab, bias=False).double()
    reference_head.weight.data.copy_(head.weight.data)
    reference_targets = Targets(*(t.double() if t is not None and t.is_floating_point() else t
                                  for t in (getattr(targets, f) for f in targets.__dataclass_fields__)))
    reference_loss, _, _ = distill_loss(hidden.double(), reference_head, reference_targets, spec)
    assert autocast_loss.dtype == torch.float32
    torch.testing.assert_close(autocast_loss.double(), reference_loss, rtol=1e-5, atol=1e-7)


def test_the_sampled_tokens_log_probs_come_back_in_position_order_across_lm_head_chunks():
    """The guard against stale weights compares these with the engine's, position by position, so they must come back
    in position order whatever the chunking (a float64 reference)."""
    torch.manual_seed(0)
    hidden_size, positions, vocab = 16, 23, 64
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(positions, hidden_size)
    tokens = torch.randint(0, vocab, (positions,))
    top = torch.randn(positions, vocab).log_softmax(-1).topk(4, dim=-1)
    targets = Targets(top.indices, top.values, torch.full((positions,), -3.0), torch.full((positions,), -2.0), None,
                      tokens, torch.full((positions,), 1 / positions))
    _, _, student_token_N = distill_loss(hidden, head, targets, LossSpec(clip="none"), chunk_positions=5)
    expected = (hidden.double() @ head.weight.double().T).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(student_token_N.double(), expected, rtol=0, atol=1e-5)
