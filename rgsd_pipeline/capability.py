"""A capability check beside rubric satisfaction: lm-evaluation-harness on the base model and a checkpoint.

Self-distillation is meant to forget less than fine-tuning on other outputs; users check that with
lm-evaluation-harness. `evaluate --lm-eval TASKS` runs its `simple_evaluate` (HF backend, in model.dtype) on
the base model and on the evaluated policy, keeps each policy's results in eval/lm-eval/<policy>/results.json
(reused while the policy's weights, the task and the limit are the same), and compares them per item: the
difference is paired over the same documents, with a bootstrap interval.

Tasks are lm-eval's own names (which may need their data sets from the Hub) or the ones bundled here
(BUNDLED: YAML and JSON lines in rgsd_pipeline/data/lm_eval/, built by bench/make_lm_eval_task.py), which need
no download.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from rgsd_pipeline import layout
from rgsd_pipeline.cli import VERBOSE_ENV
from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.errors import UserError
from rgsd_pipeline.fingerprints import model_fingerprint
from rgsd_pipeline.shards import write_json_atomic

BUNDLED = ("rgsd_arithmetic",)


def bundled_task(name: str) -> dict:
    """A bundled task's config, its data file given by absolute path (lm-eval reads paths from the working folder)."""
    folder = Path(str(resources.files("rgsd_pipeline") / "data" / "lm_eval"))
    config = yaml.safe_load((folder / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(folder / path) for split, path in files.items()}
    return config


def _per_item(samples: list[dict], metric: str) -> dict[str, float]:
    """document id (as text, as JSON keeps it) -> the metric's value on that document."""
    return {str(s["doc_id"]): float(s[metric]) for s in samples if metric in s}


def run_tasks(model_path: Path, config: RunConfig, tasks: list[str], limit: int | None) -> dict:
    """task -> {limit, metrics: {name: value}, stderr: {name: value}, items: {metric: {document id: value}}} for
    one model folder."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("evaluate --lm-eval needs lm-evaluation-harness: pip install 'rgsd-pipeline[lm-eval]' "
                        "(make setup installs it)") from None
    import torch

    task_specs = [bundled_task(t) if t in BUNDLED else t for t in tasks]
    model_args = {"pretrained": str(model_path), "dtype": config.model.dtype,
                  "trust_remote_code": config.model.trust_remote_code}
    # lm-eval's progress bars write to stderr whatever its verbosity: the command's output is ours unless --verbose
    quiet = contextlib.nullcontext() if os.environ.get(VERBOSE_ENV) else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            output = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=task_specs, limit=limit,
                                             batch_size=config.engine.hf_batch_size,
                                             device="cuda" if torch.cuda.is_available() else "cpu", log_samples=True,
                                             bootstrap_iters=1000, random_seed=config.seed, verbosity="ERROR")
    except (KeyError, ValueError) as err:
        raise UserError(f"lm-eval could not run {', '.join(tasks)}: {type(err).__name__}: {str(err)[:500]} (task "
                        f"names are lm-eval's, or bundled: {', '.join(BUNDLED)})") from None
    missing = [t for t in tasks if output is None or t not in output["results"]]
    if missing:
        raise UserError(f"lm-eval ran no task named {', '.join(missing)}: not one of its tasks, or its data could not "
                        f"be loaded (offline, only the bundled tasks can: {', '.join(BUNDLED)}); --verbose shows why")
    results = {}
    for task in tasks:
        values = output["results"][task]
        metrics = {key.split(",")[0]: float(v) for key, v in values.items()
                   if "," in key and "_stderr" not in key and isinstance(v, (int, float))}
        stderr = {key.split(",")[0].removesuffix("_stderr"): float(v) for key, v in values.items()
                  if "_stderr," in key and isinstance(v, (int, float))}
        samples = output.get("samples", {}).get(task, [])
        results[task] = {"limit": limit, "metrics": metrics, "stderr": stderr,
                         "items": {m: _per_item(samples, m) for m in metrics}}
    return results


def evaluate_policy(run: Path, label: str, model_path: Path, config: RunConfig, tasks: list[str],
                    limit: int | None, echo) -> dict:
    """eval/lm-eval/<label>/results.json for `tasks` (a task already there for these weights and limit is reused);
    returns its task entries."""
    path = layout.lm_eval_file(run, label)
    weights = model_fingerprint(model_path)
    kept = json.loads(path.read_text()) if path.exists() else {}
    kept = kept if kept.get("policy_fingerprint") == weights else {"policy_fingerprint": weights, "scores": {}}
    todo = [t for t in tasks if t not in kept["scores"] or kept["scores"][t]["limit"] != limit]
    if todo:
        echo(f"lm-eval: {', '.join(todo)} on {label} ({model_path})" + (f", first {limit} items" if limit else ""))
        kept["scores"].update(run_tasks(model_path, config, todo, limit))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, kept)
    return {t: kept["scores"][t] for t in tasks}


def comparison(before: dict, after: dict, before_label: str, after_label: str) -> str:
    """A table of every task and metric: both policies and the paired difference with its 95% interval."""
    from rgsd_pipeline.grading import interval

    rows = [f"  {'task / metric':32s} {before_label:>9s} {after_label:>9s}   difference [95% CI, paired]"]
    for task, scores in after.items():
        for metric, value in scores["metrics"].items():
            base_value = before[task]["metrics"].get(metric)
            pairs = [(b, scores["items"][metric][doc]) for doc, b in before[task]["items"].get(metric, {}).items()
                     if doc in scores["items"].get(metric, {})]
            differences = np.array([a - b for b, a in pairs])
            spread = interval(differences, clip=False) if len(differences) else None
            shown = (f"{value - base_value:+.3f} [{spread['low']:+.3f}, {spread['high']:+.3f}] over {spread['n']} items"
                     if spread and base_value is not None else "-")
            base_text = f"{base_value:.3f}" if base_value is not None else "-"
            rows.append(f"  {task + ' ' + metric:32s} {base_text:>9s} {value:9.3f}   {shown}")
    return "\n".join(rows)
