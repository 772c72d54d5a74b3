"""`evaluate --lm-eval`: lm-evaluation-harness on the bundled arithmetic task, base and checkpoint, checked against
the choice log-likelihoods computed here with transformers."""

import json

import pytest
import torch
from helpers import ROOT, cli

pytest.importorskip("lm_eval")
LIMIT = 24


def accuracy_by_hand(model_path, rows) -> dict[str, float]:
    """Per item: 1 when the answer's continuation is the most likely of the four choices (sum of its tokens'
    log-probs after "Question: ...\\nAnswer:"), as a multiple-choice task scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    correct = {}
    for index, row in enumerate(rows):
        context = f"Question: {row['question']}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(context + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            scores.append(sum(logp[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids))))
        correct[str(index)] = float(max(range(4), key=scores.__getitem__) == row["answer"])
    return correct


@pytest.mark.slow
def test_lm_eval_on_the_bundled_task_scores_base_and_checkpoint_as_computed_by_hand(evaluated_run, tiny_path):
    out = cli("evaluate", "--run", evaluated_run, "--iteration", 0, "--lm-eval", "rgsd_arithmetic",
              "--lm-eval-limit", LIMIT).stdout
    assert "rgsd_arithmetic acc" in out and "difference [95% CI, paired]" in out, out
    rows = [json.loads(line) for line in
            (ROOT / "rgsd_pipeline" / "data" / "lm_eval" / "rgsd_arithmetic.jsonl").read_text().splitlines()[:LIMIT]]
    for label, model in (("base", tiny_path), ("iter-000", evaluated_run / "iter-000" / "checkpoint")):
        kept = json.loads((evaluated_run / "eval" / "lm-eval" / label / "results.json").read_text())
        scores = kept["scores"]["rgsd_arithmetic"]
        assert scores["limit"] == LIMIT and len(scores["items"]["acc"]) == LIMIT
        assert scores["items"]["acc"] == accuracy_by_hand(model, rows), label
        assert scores["metrics"]["acc"] == pytest.approx(sum(scores["items"]["acc"].values()) / LIMIT)
    # A second run reuses the results kept for the same weights and limit.
    again = cli("evaluate", "--run", evaluated_run, "--iteration", 0, "--lm-eval", "rgsd_arithmetic",
                "--lm-eval-limit", LIMIT).stdout
    assert "lm-eval: rgsd_arithmetic on" not in again and "rgsd_arithmetic acc" in again


def test_lm_eval_refuses_the_teacher_and_an_unknown_task(evaluated_run):
    result = cli("evaluate", "--run", evaluated_run, "--iteration", "teacher", "--lm-eval", "rgsd_arithmetic",
                 check=False)
    assert result.returncode == 2 and "the teacher is the base model" in result.stderr
    result = cli("evaluate", "--run", evaluated_run, "--iteration", "base", "--lm-eval", "no_such_task_here",
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no_such_task_here" in result.stderr, \
        result.stderr[-2000:]
