"""The judge-based baseline: group advantages and the clipped policy gradient against float64 references, the
`reward` stage (rules and an LLM judge that is slow, killed or failing), and a GRPO iteration end to end."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from helpers import cli, copy_run, kill_after_first_shard

from rgsd_pipeline.policy_gradient import clipped_policy_gradient, group_advantages
from rgsd_pipeline.rule_judge import RULES_VERSION, check, predicate_of
from rgsd_pipeline.shards import read_stage
from schemas import PROMPTS, REWARDS, ROLLOUTS

# ---------------------------------------------------------------- the arithmetic, against float64 references


def test_group_advantages_by_hand():
    ids = ["a", "a", "a", "b", "b", "c", "d", "d", "d"]
    rewards = [1.0, 0.0, 0.5, 0.3, 0.3, 0.9, 1.0, None, 0.0]
    got = group_advantages(ids, rewards, eps=0.0)
    # a: mean 0.5, sample std 0.5; b: a tie teaches nothing; c: a group of one; d: the rollout without a reward
    # leaves its group, which is then {1, 0}: mean 0.5, sample std sqrt(0.5).
    want = [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.5 / math.sqrt(0.5), None, -0.5 / math.sqrt(0.5)]
    assert got[7] is None
    np.testing.assert_allclose([g for g in got if g is not None], [w for w in want if w is not None], atol=1e-12)


def test_clipped_policy_gradient_equals_its_definition_in_float64():
    generator = torch.Generator().manual_seed(0)
    n = 400
    old = -torch.rand(n, generator=generator, dtype=torch.float64) * 4
    logp = (old + 0.6 * torch.randn(n, generator=generator, dtype=torch.float64)).clamp(max=0).requires_grad_()
    advantage = torch.randn(n, generator=generator, dtype=torch.float64)
    reference = old + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    eps, beta = 0.2, 0.04
    loss, ratio, clipped, kl = clipped_policy_gradient(logp, old, advantage, eps, reference, beta)
    loss.sum().backward()
    for i in range(n):
        r = math.exp(logp[i].item() - old[i].item())
        a = advantage[i].item()
        surrogate = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        d = reference[i].item() - logp[i].item()
        k3 = math.exp(d) - d - 1
        assert loss[i].item() == pytest.approx(-surrogate + beta * k3, abs=1e-12)
        assert kl[i].item() == pytest.approx(k3, abs=1e-12) and k3 >= 0
        outside = (a > 0 and r > 1 + eps) or (a < 0 and r < 1 - eps)  # the surrogate's flat side: no gradient
        assert bool(clipped[i]) == outside
        grad = (0.0 if outside else -a * r) + beta * (1 - math.exp(d))
        assert logp.grad[i].item() == pytest.approx(grad, abs=1e-10)
    assert clipped.any() and not clipped.all()
    # Without a reference the KL term is absent; at ratio 1 the gradient is -A per token (REINFORCE).
    flat, _, _, none = clipped_policy_gradient(old.clone().requires_grad_(), old, advantage, eps)
    assert torch.equal(none, torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(flat, -advantage)


def test_the_behaviour_weight_multiplies_the_surrogate_alone():
    generator = torch.Generator().manual_seed(1)
    n = 50
    old = -torch.rand(n, generator=generator, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)).requires_grad_()
    advantage = torch.randn(n, generator=generator, dtype=torch.float64)
    reference = old - 0.1
    weight = torch.rand(n, generator=generator, dtype=torch.float64) * 2
    loss, *_ = clipped_policy_gradient(logp, old, advantage, 0.2, reference, 0.1, weight)
    for i in range(n):
        r, a = math.exp(logp[i].item() - old[i].item()), advantage[i].item()
        d = reference[i].item() - logp[i].item()
        want = -weight[i].item() * min(r * a, min(max(r, 0.8), 1.2) * a) + 0.1 * (math.exp(d) - d - 1)
        assert loss[i].item() == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------- pi_old, the behaviour policy, the reference


def grpo_trainer(tiny_path, examples, **train):
    from rgsd_pipeline.checkpoints import load_student
    from rgsd_pipeline.config import load_config
    from rgsd_pipeline.trainer import Trainer, World

    overrides = [f"train.{k}={v}" for k, v in {"loss": "grpo", "max_grad_norm": 0, "learning_rate": 1e-3,
                                              **train}.items()]
    config = load_config("configs/tiny.yaml", ["rollout.samples_per_prompt=2", *overrides])
    model = load_student(tiny_path, tiny_path, None, config)
    return Trainer(model, examples, config.train, World(), pad_id=0, max_response_tokens=16), config


def grpo_examples(seed=0, count=8):
    """Rollouts whose engine log-probs are another distribution's (a tempered, bf16 engine): mu != pi_theta."""
    from rgsd_pipeline.examples import synthetic_example

    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        example = synthetic_example(rng.integers(3, 1000, 24), 12, np.zeros((12, 0), np.int64), np.zeros((12, 0)))
        example.advantage = float(rng.normal())
        example.sampling_logprob = (-rng.uniform(0.5, 8.0, 12)).astype(np.float32)
        examples.append(example)
    return examples


def float64_logprobs(model, examples):
    """Each example's sampled-token log-probs at its positions under `model`, in float64, from full logits."""
    import copy

    model64 = copy.deepcopy(model).double()
    out = []
    for e in examples:
        ids = torch.from_numpy(e.input_ids)[None]
        logp = model64(input_ids=ids).logits[0].log_softmax(-1)
        columns = torch.from_numpy(e.prompt_len + e.positions - 1)
        out.append(logp[columns, ids[0, columns + 1]])
    return model64, out


def test_grpo_first_step_is_the_truncated_importance_weighted_policy_gradient_in_float64(tiny_path):
    """pi_old at the first step is the trainer's own log-prob, so the ratio is 1 and nothing is clipped whatever the
    engine logged; the sampling distribution enters as w = min(cap, pi_old / mu). The gradient equals
    -sum_t w_t A_t grad log pi(y_t) / N computed from full float64 logits. (The old code put the engine's log-probs
    in the ratio: ratio_mean far from 1, a third of the tokens clipped.)"""
    examples = grpo_examples()
    trainer, config = grpo_trainer(tiny_path, examples, batch_size=8, micro_batch_size=4)
    params = dict(trainer.model.named_parameters())
    grads = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.detach().double().clone() for n, p in params.items()}))
    model64, logprobs = float64_logprobs(trainer.model, examples)
    metrics = trainer.step(0)
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_clip_fraction"] == 0.0
    tokens = sum(len(e.positions) for e in examples)
    loss = 0.0
    weights = []
    for e, logp in zip(examples, logprobs, strict=True):
        w = (logp.detach() - torch.from_numpy(e.sampling_logprob).double()).exp().clamp(max=config.train.importance_cap)
        weights.append(w)
        loss = loss - (w * e.advantage * logp).sum() / tokens
    loss.backward()
    assert metrics["behaviour_weight"] == pytest.approx(float(torch.cat(weights).mean()), rel=1e-5)
    assert 0.0 < metrics["behaviour_weight"] < config.train.importance_cap
    for name, param in model64.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=2e-4, atol=1e-7)


def test_later_steps_take_pi_old_from_the_iterations_starting_weights(tiny_path):
    """An iteration of two steps: the second step's ratio is pi_theta (after step 1) over pi at the iteration's
    start, both as float64 references give them, not over what the engine logged."""
    import copy

    examples = grpo_examples(seed=1)
    trainer, _ = grpo_trainer(tiny_path, examples, batch_size=4, micro_batch_size=4)
    trainer.keep_old_logprobs()
    _, start = float64_logprobs(trainer.model, examples)
    trainer.step(0)
    _, after_first = float64_logprobs(copy.deepcopy(trainer.model), examples)
    second = trainer.batches[1]
    metrics = trainer.step(1)
    ratios = torch.cat([(after_first[i] - start[i]).detach().exp() for i in second])
    assert metrics["ratio_mean"] == pytest.approx(float(ratios.mean()), rel=1e-5)
    assert abs(metrics["ratio_mean"] - 1.0) > 1e-4  # the first step moved the policy


def test_kl_to_the_reference_is_zero_at_identical_weights_under_bf16_autocast(tiny_path):
    """The frozen reference runs under the policy's autocast, so k3 at step 1 (identical weights) is 0; run outside
    it (the old code) it measured bf16 rounding as KL."""
    from rgsd_pipeline.models import load_model

    trainer, config = grpo_trainer(tiny_path, grpo_examples(seed=2), batch_size=8, micro_batch_size=4, bf16="true",
                                   kl_coef=0.1)
    trainer.reference = load_model(tiny_path, config.model.dtype).requires_grad_(False).eval()
    metrics = trainer.step(0)
    assert metrics["kl_to_base"] == 0.0 and metrics["ratio_mean"] == 1.0


# ---------------------------------------------------------------- the reward stage

ROWS = [{"prompt": [{"role": "user", "content": f"Question {i}: say something about the heart."}],
         "rubric": [{"criterion": "Keeps it under six words.", "points": 2, "tags": ['check:{"max_words": 6}']},
                    {"criterion": "Uses the letter e.", "points": 1, "tags": ['check:{"regex": "e"}']},
                    {"criterion": "Says 'rubric'.", "points": -1, "tags": ['check:{"any": ["rubric*"]}']}]}
        for i in range(8)]
SETTINGS = ["engine.kind=hf", "data.heldout_fraction=0", "data.rows_per_shard=8", "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=12", "train.loss=grpo", "train.batch_size=32", "train.micro_batch_size=16",
            "train.learning_rate=1e-3"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo-data") / "checkable.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


@pytest.fixture(scope="module")
def rolled_out(data_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo") / "run"
    cli("prepare", "--config", "configs/tiny.yaml", "--run", run, f"data.sources=[{data_file}]", *SETTINGS)
    cli("rollout", "--run", run, "--iteration", 0)
    return run


def rewards_frame(run):
    return read_stage(run / "iter-000" / "rewards", REWARDS).lazy().collect()


def test_rule_rewards_equal_the_rule_judge_applied_by_hand(rolled_out, tmp_path):
    run = copy_run(rolled_out, tmp_path / "rules")
    cli("reward", "--run", run, "--iteration", 0)
    rollouts = read_stage(run / "iter-000" / "rollouts", ROLLOUTS).lazy().collect().to_dicts()
    rubric = {p["prompt_id"]: p["rubric"] for p in read_stage(run / "prompts", PROMPTS).lazy().collect().to_dicts()}
    rewards = rewards_frame(run).to_dicts()
    assert len(rewards) == len(rollouts) == 32
    for rollout, reward in zip(rollouts, rewards, strict=True):
        criteria = rubric[rollout["prompt_id"]]
        met = [check(predicate_of(c["tags"]), rollout["response_text"])[0] for c in criteria]
        achieved = sum(c["points"] for c, m in zip(criteria, met, strict=True) if m)
        assert (reward["prompt_id"], reward["sample_idx"]) == (rollout["prompt_id"], rollout["sample_idx"])
        assert reward["reward"] == pytest.approx(achieved / 3, abs=1e-6)  # positive points: 2 + 1
        assert [v["met"] for v in reward["verdicts"]] == met and reward["judge"] == f"rules predicates-v{RULES_VERSION}"
    assert len({r["reward"] for r in rewards}) > 1  # the rollouts differ, so the groups have something to teach


class SlowJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that meets every criterion after a pause, or fails while `failing` is set."""

    calls = 0
    failing = False

    def log_message(self, *args):
        pass

    def send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.send(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        request = json.loads(self.rfile.read(length))
        type(self).calls += 1
        if type(self).failing:
            self.send(503, {"error": {"message": "overloaded"}})
            return
        time.sleep(0.05)
        count = request["messages"][-1]["content"].count(" points) ")
        verdicts = {"verdicts": [{"explanation": "ok", "met": True} for _ in range(count)]}
        self.send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": json.dumps(verdicts)}}]})


@pytest.fixture
def slow_judge():
    SlowJudge.calls, SlowJudge.failing = 0, False
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def llm_judged(rolled_out, target, url):
    return copy_run(rolled_out, target, reward__judge="llm", reward__judge_url=url, reward__judge_model="judge",
                    reward__judge_max_retries=0, reward__judge_concurrency=2)


@pytest.mark.slow
def test_reward_killed_then_rerun_equals_an_uninterrupted_run(rolled_out, slow_judge, tmp_path):
    whole = llm_judged(rolled_out, tmp_path / "whole", slow_judge)
    cli("reward", "--run", whole, "--iteration", 0)
    killed = llm_judged(rolled_out, tmp_path / "killed", slow_judge)
    done = kill_after_first_shard(["reward", "--run", killed, "--iteration", 0], killed / "iter-000" / "rewards")
    assert 1 <= done < 4
    cli("reward", "--run", killed, "--iteration", 0)
    assert rewards_frame(killed).equals(rewards_frame(whole))
    # Every criterion met, the pitfall too: (2 + 1 - 1) / 3.
    assert rewards_frame(whole)["reward"].to_list() == pytest.approx([2 / 3] * 32)


def test_a_failing_llm_judge_is_named_and_a_rerun_grades_only_what_is_missing(rolled_out, slow_judge, tmp_path):
    run = llm_judged(rolled_out, tmp_path / "failing", slow_judge)
    SlowJudge.failing = True
    result = cli("reward", "--run", run, "--iteration", 0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "judge call(s) failed while grading" in result.stderr and "part-00000.parquet" in result.stderr
    assert not list((run / "iter-000" / "rewards").glob("part-*.parquet"))
    SlowJudge.failing, SlowJudge.calls = False, 0
    cli("reward", "--run", run, "--iteration", 0)
    assert SlowJudge.calls == 32  # one per rollout, nothing graded twice
    SlowJudge.calls = 0
    for part in sorted((run / "iter-000" / "rewards").glob("part-*.parquet"))[1:]:
        part.unlink()
    cli("reward", "--run", run, "--iteration", 0)
    assert SlowJudge.calls == 0  # the verdicts of the deleted shards come from the judge cache


@pytest.mark.slow
def test_one_grpo_iteration_end_to_end(data_file, tmp_path):
    """rollout -> reward -> train, resident: the checkpoint moved, the chain links the rewards."""
    from safetensors.torch import load_file

    from rgsd_pipeline.models import resolve_model

    run = tmp_path / "grpo"
    out = cli("iterate", "--config", "configs/tiny.yaml", "--run", run, "--iterations", 1,
              f"data.sources=[{data_file}]", *SETTINGS, "train.kl_coef=0.05").stdout
    assert "── reward iteration 0" in out and "score iteration" not in out
    chain = json.loads((run / "chain.json").read_text())
    assert "rewards" in chain[0] and "signals" not in chain[0]
    metrics = [json.loads(line) for line in (run / "iter-000" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # on-policy
    assert metrics[0]["kl_to_base"] == pytest.approx(0.0, abs=1e-5) and "divergence" not in metrics[0]
    base = load_file(resolve_model("builtin:tiny") / "model.safetensors")
    trained = load_file(run / "iter-000" / "checkpoint" / "model.safetensors")
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 1e-4
    again = cli("iterate", "--run", run, "--iterations", 1).stdout
    assert again.count(": complete") == 3


# ---------------------------------------------------------------- the hybrid: distillation plus the judge's reward


def test_the_hybrid_loss_is_the_distillation_loss_plus_the_weighted_grpo_loss_in_float64():
    """jsd+grpo composes the two objects: its loss and gradient are JSD's plus train.reward_weight times GRPO's,
    each computed alone, and its metrics carry both objects' fields and each term."""
    from rgsd_pipeline.distill import LossSpec, Targets, distill_loss
    from rgsd_pipeline.objectives import of

    generator = torch.Generator().manual_seed(3)
    positions, hidden_size, vocabulary, k = 11, 6, 13, 4
    head = torch.nn.Linear(hidden_size, vocabulary, bias=False).double()
    hidden = torch.randn(positions, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(positions, vocabulary, generator=generator, dtype=torch.float64).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    tokens = torch.randint(0, vocabulary, (positions,), generator=generator)
    targets = Targets(top.indices, top.values, teacher.scatter(-1, top.indices, -float("inf")).logsumexp(-1),
                      teacher.gather(-1, tokens[:, None])[:, 0], -torch.rand(positions, dtype=torch.float64) * 3,
                      tokens, torch.full((positions,), 1 / positions, dtype=torch.float64),
                      advantage_N=torch.randn(positions, generator=generator, dtype=torch.float64))
    results = {}
    for kind in ("jsd", "grpo", "jsd+grpo"):
        loss, stats, _ = distill_loss(hidden, head, targets, LossSpec(kind=kind, reward_weight=0.3),
                                      chunk_positions=4)
        results[kind] = (loss, dict(zip(of(kind).stats, stats.tolist(), strict=True)),
                         torch.autograd.grad(loss, [hidden, head.weight]))
    jsd, grpo, hybrid = results["jsd"], results["grpo"], results["jsd+grpo"]
    torch.testing.assert_close(hybrid[0], jsd[0] + 0.3 * grpo[0])
    for both, a, b in zip(hybrid[2], jsd[2], grpo[2], strict=True):
        torch.testing.assert_close(both, a + 0.3 * b)
    assert hybrid[1]["distill_loss"] == pytest.approx(jsd[0].item()) and hybrid[1]["policy_loss"] == pytest.approx(
        grpo[0].item())
    metrics = of("jsd+grpo").metrics(hybrid[1], positions)
    assert {"divergence", "clip_fraction", "kl_to_base", "ratio_mean", "behaviour_weight", "distill_loss",
            "policy_loss"} <= metrics.keys()


def test_the_hybrid_needs_groups_and_reads_signals_and_rewards():
    from rgsd_pipeline.chain import stages_for
    from rgsd_pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.loss=jsd\\+grpo needs rollout.samples_per_prompt >= 2"):
        load_config("configs/tiny.yaml", ["train.loss=jsd+grpo"])
    config = load_config("configs/tiny.yaml", ["train.loss=jsd+grpo", "rollout.samples_per_prompt=2"])
    assert stages_for(config) == ("rollout", "score", "reward", "train")
    assert config.train.reads_behaviour_logprobs  # GRPO's importance weight against the sampling distribution


@pytest.mark.slow
def test_one_hybrid_iteration_end_to_end(data_file, tmp_path):
    """rollout -> score -> reward -> train: the chain links both signals and rewards, the metrics show both terms and
    the loss is their weighted sum."""
    run = tmp_path / "hybrid"
    settings = [s.replace("train.loss=grpo", "train.loss=jsd+grpo") for s in SETTINGS]
    out = cli("iterate", "--config", "configs/tiny.yaml", "--run", run, "--iterations", 1,
              f"data.sources=[{data_file}]", *settings, "train.reward_weight=0.5").stdout
    assert "── score iteration 0" in out and "── reward iteration 0" in out
    chain = json.loads((run / "chain.json").read_text())
    assert "rewards" in chain[0] and "signals" in chain[0]
    metrics = [json.loads(line) for line in (run / "iter-000" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["ratio_mean"] == 1.0 and metrics[0]["divergence"] > 0
    # fp32 sums whose group advantages cancel: equal to float rounding of the terms (about 1e-3 each)
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["distill_loss"] + 0.5 * metrics[0]["policy_loss"], abs=1e-8)
    assert "GRPO term" in out
