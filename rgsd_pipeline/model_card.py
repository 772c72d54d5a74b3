"""The model card of a checkpoint: the Hub's README.md, a YAML header and what a reader of the model wants to know.

Every checkpoint folder the trainer exports carries one, and `rgsd-pipeline export` writes it again with the
latest evaluations, so `hf upload ORG/NAME FOLDER` publishes the folder as it is. The header holds what the Hub
indexes (`base_model` when the base is a Hub id, the Hub data sets, `library_name`, `tags`); the text states the
recipe, the iteration and global step, the fingerprint chain from the base model to this checkpoint, the last
training step's numbers and the held-out evaluations found under the run's eval/. The card is not part of a
model's fingerprint (fingerprints.py hashes config, tokenizer and weights), so writing it changes no chain.
Nothing in it depends on where the run folder lies or on timing, so equal runs write equal cards.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rgsd_pipeline import layout
from rgsd_pipeline.config import RunConfig
from rgsd_pipeline.fingerprints import model_fingerprint
from rgsd_pipeline.hub import is_repo_id
from rgsd_pipeline.shards import write_text_atomic
from rgsd_pipeline.sources import hub_source, source_label

HELDOUT = "heldout"  # evaluation.HELDOUT: the set the card reports


def _header(config: RunConfig, adapters: bool) -> dict:
    header = {}
    if is_repo_id(config.model.path) and not Path(config.model.path).expanduser().exists():
        header["base_model"] = config.model.path
    datasets = sorted({s.repo_id for entry in config.data.sources if (s := hub_source(entry)) is not None})
    if datasets:
        header["datasets"] = datasets
    header["library_name"] = "peft" if adapters else "transformers"
    header["pipeline_tag"] = "text-generation"
    header["tags"] = ["rgsd", "rubric-guided-self-distillation", "distillation"]
    return header


def _base_line(config: RunConfig) -> str:
    model = config.model
    if model.commit:
        return f"`{model.path}` at revision `{model.revision}` (commit `{model.commit}`)"
    return f"`{model.path}`"


def _data_lines(config: RunConfig) -> list[str]:
    lines = []
    for entry in config.data.sources:
        source = hub_source(entry)
        commit = f" (commit `{source.commit}`)" if source is not None and source.commit else ""
        lines.append(f"- `{source_label(entry)}`{commit}")
    return lines


def _chain_rows(run: Path, iteration: int, checkpoint: Path, config: RunConfig) -> list[str]:
    """iteration | policy fingerprint | signals (or rewards) | checkpoint fingerprint, from the base to `iteration`:
    earlier iterations from chain.json, this one computed (a record read, no weights hashed)."""
    from rgsd_pipeline.models import resolve_model

    links = json.loads(layout.chain_file(run).read_text()) if layout.chain_file(run).exists() else []
    rows = []
    for link in links:
        if link["iteration"] < iteration:
            trained_on = json.loads(layout.provenance_file(layout.checkpoint_dir(run, link["iteration"])).read_text())
            rows.append((link["iteration"], link["policy_fingerprint"],
                         trained_on.get("signals") or trained_on.get("rewards", ""), link["checkpoint_fingerprint"]))
    provenance = json.loads(layout.provenance_file(checkpoint).read_text())
    policy = layout.policy_path(run, iteration, resolve_model(config.model))
    rows.append((iteration, model_fingerprint(policy), provenance.get("signals") or provenance.get("rewards", ""),
                 model_fingerprint(checkpoint)))
    return [f"| {i} | `{p}` | `{s}` | `{c}` |" for i, p, s, c in rows]


def _training_line(run: Path, iteration: int) -> str:
    metrics = layout.metrics_file(run, iteration)
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    if not lines:
        return "- no training metrics recorded"
    last = lines[-1]
    shown = [f"{key.replace('_', ' ')} {last[key]:.4f}" for key in ("loss", "divergence", "clip_fraction", "kl_to_base")
             if key in last]
    return f"- last optimizer step of iteration {iteration} (global step {last['global_step']}): {', '.join(shown)}"


def _evaluation_lines(run: Path, label: str) -> list[str]:
    """The held-out evaluations of `label` beside the base model's: rubric satisfaction per judge, judge-free
    diagnostics, lm-evaluation-harness scores."""
    lines = []
    for who in (layout.BASE_LABEL, label):
        folder = layout.eval_dir(run, HELDOUT, who)
        for judge, path in layout.summary_judges(folder).items():
            overall = json.loads(path.read_text())["overall"]
            if overall["mean"] is not None:
                lines.append(f"- {who}: rubric satisfaction ({judge} judge, {overall['n']} held-out prompts) "
                             f"{overall['mean']:.3f} [95% CI {overall['low']:.3f}, {overall['high']:.3f}]")
        diagnostics = layout.diagnostics_file(run, HELDOUT, who)
        if diagnostics.exists():
            values = json.loads(diagnostics.read_text())
            shown = [f"{key.replace('_', ' ')} {values[key]:.4f}" for key in
                     ("divergence", "mean_length", "truncation_rate", "leakage_rate") if values.get(key) is not None]
            lines.append(f"- {who}: {', '.join(shown)} ({values['answers']} held-out answers)")
        lm_eval = layout.lm_eval_file(run, who)
        if lm_eval.exists():
            for task, scores in json.loads(lm_eval.read_text())["scores"].items():
                items = f", first {scores['limit']} items" if scores["limit"] else ""
                lines.append(f"- {who}: lm-eval {task}{items}: "
                             + ", ".join(f"{m} {v:.4f}" for m, v in scores["metrics"].items()))
    return lines


def card_text(run: Path, iteration: int, config: RunConfig, checkpoint: Path, adapters: bool | None = None) -> str:
    """The README.md of iteration `iteration`'s checkpoint (whose weights and provenance are written); `adapters`:
    whether the folder holds LoRA adapters alone (default: as the checkpoint does)."""
    provenance = json.loads(layout.provenance_file(checkpoint).read_text())
    adapters = bool(provenance.get("lora_adapters")) if adapters is None else adapters
    label = layout.policy_label(iteration + 1)
    train, template = config.train, config.template
    loss = (f"{train.loss} (beta {train.beta}, clip {train.clip} at tau {train.tau})" if train.loss == "jsd"
            else train.loss)
    evaluations = _evaluation_lines(run, label)
    parts = [
        "---", yaml.safe_dump(_header(config, adapters), sort_keys=False).strip(), "---", "",
        f"# {config.name}: RGSD iteration {iteration}", "",
        f"{'LoRA adapters for' if adapters else 'A fine-tune of'} {_base_line(config)}, trained with rgsd-pipeline's "
        "Rubric-Guided Self-Distillation: the base model reading each prompt's rubric is the teacher, the model "
        "reading the prompt alone is the student, and the student is trained token by token to match the "
        "teacher's distribution on its own samples. No judge is used in training.", "",
        "## Training", "",
        f"- recipe `{config.name}`: loss {loss}, learning rate {train.learning_rate:g}, batch {train.batch_size}, "
        f"teacher view `{template.teacher}`, {config.rollout.samples_per_prompt} rollout(s) per prompt, "
        f"{config.rollout.prompts_per_iteration or 'all'} prompts per iteration, {config.model.dtype} weights",
        f"- iteration {iteration}, global optimizer step {provenance.get('global_step')}",
        _training_line(run, iteration), "", "Data:", *_data_lines(config), "",
        "## Fingerprint chain", "",
        "Each policy (the base model at iteration 0) sampled its iteration's rollouts, the frozen base model scored "
        "them, and training on those signals gave the checkpoint (sha256 over config, tokenizer and weights; "
        "rgsd-pipeline's `chain.json` holds the same).", "",
        "| iteration | policy | trained on | checkpoint |", "| --- | --- | --- | --- |",
        *_chain_rows(run, iteration, checkpoint, config), "",
        "## Evaluation", "",
        *(evaluations or [f"Not evaluated yet: `rgsd-pipeline evaluate --run RUN --iteration {iteration}` (and "
                          f"`--iteration base`), then `rgsd-pipeline export --run RUN --iteration {iteration} --to "
                          "DIR` writes this card again with the results."]), "",
    ]
    return "\n".join(parts)


def write_model_card(folder: Path, run: Path, iteration: int, config: RunConfig, checkpoint: Path | None = None,
                     adapters: bool | None = None) -> None:
    """Write README.md into `folder` for iteration `iteration`'s checkpoint (`checkpoint`, default `folder`)."""
    text = card_text(Path(run), iteration, config, Path(checkpoint or folder), adapters)
    write_text_atomic(layout.model_card_file(folder), text)
