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
