"""Metrics where cluster users watch runs: TensorBoard, W&B or MLflow (`train.report_to`), from one rank only.

`metrics.jsonl` stays the source of truth; a tracker mirrors it, and adds what a run's files do not hold as
numbers: per-iteration time split and tokens/s of rollout and score, and the held-out diagnostics and
rubric scores of `evaluate`. Every value is logged at the run's global optimizer step (the policy's step
for rollout, score and evaluate), under `train/`, `rollout/`, `score/` and `eval/<set>/`.

- `tensorboard`: event files under runs/<name>/tracking/tensorboard (torch's SummaryWriter);
- `wandb`: offline unless the user set WANDB_MODE (runs/<name>/tracking/wandb; `wandb sync` uploads it);
  one W&B run per RGSD run, resumed by the id kept in runs/<name>/tracking/ids.json;
- `mlflow`: MLFLOW_TRACKING_URI, else a file store under runs/<name>/tracking/mlruns; one MLflow run per
  RGSD run, resumed by its id.

A step is logged once: runs/<name>/tracking/logged.json keeps, per tracker, the last global step whose
training metrics were logged, so a resumed iteration does not log its steps again. `none` (the default)
imports nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import uuid
from pathlib import Path

from rgsd_pipeline import layout
from rgsd_pipeline.shards import write_json_atomic

_OPEN: dict[tuple[str, str], Tracker] = {}


class Tracker:
    """The `none` tracker, and the interface of the others."""

    kind = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record numeric values at a global step."""

    def close(self) -> None:
        """Flush and finish."""


class TensorBoard(Tracker):
    kind = "tensorboard"

    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB(Tracker):
    kind = "wandb"

    def __init__(self, folder: Path, config: dict):
        import wandb

        self.run = wandb.init(project=config["train"]["report_project"], name=config["name"], config=config,
                              dir=str(folder), id=_run_id(folder, "wandb"), resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class MLflow(Tracker):
    kind = "mlflow"

    def __init__(self, folder: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store of the run's own (MLflow 3 asks to opt in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", (folder / "mlruns").resolve().as_uri()))
        mlflow.set_experiment(config["train"]["report_project"])
        ids = _ids(folder)
        self.run = mlflow.start_run(run_id=ids.get("mlflow"), run_name=config["name"])
        if "mlflow" not in ids:
            write_json_atomic(folder / "ids.json", {**ids, "mlflow": self.run.info.run_id})
            mlflow.log_params({f"{section}.{key}": value for section, values in config.items()
                               if isinstance(values, dict) for key, value in values.items()
                               if isinstance(value, (int, float, str, bool))})

    def log(self, metrics, step):
        self.mlflow.log_metrics(metrics, step=step)

    def close(self):
        self.mlflow.end_run()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _ids(folder: Path) -> dict:
    path = folder / "ids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _run_id(folder: Path, kind: str) -> str:
    """This RGSD run's id at a tracker, made once and kept, so every process and rerun logs to the same run."""
    ids = _ids(folder)
    if kind not in ids:
        ids[kind] = uuid.uuid4().hex[:12]
        write_json_atomic(folder / "ids.json", ids)
    return ids[kind]


def tracker(run: Path, config, world=None) -> Tracker:
    """The run's tracker in this process (opened once, closed at exit); `none` on every rank but the main one."""
    from rgsd_pipeline.config import to_dict

    kind = config.train.report_to
    if kind == "none" or (world is not None and not world.main):
        return Tracker()
    key = (str(Path(run).resolve()), kind)
    if key not in _OPEN:
        folder = layout.tracking_dir(run)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _OPEN[key] = KINDS[kind](folder, to_dict(config))
        except ImportError:
            from rgsd_pipeline.config import ConfigError

            raise ConfigError(f"train.report_to={kind} needs its package: pip install 'rgsd-pipeline[track]'") from None
        if len(_OPEN) == 1:
            atexit.register(close_all)
    return _OPEN[key]


def log_training(run: Path, config, world, metrics: dict) -> None:
    """One metrics.jsonl line, under train/, at its global step, unless that step was logged already."""
    sink = tracker(run, config, world)
    if sink.kind == "none":
        return
    cursor = layout.tracking_dir(run) / "logged.json"
    logged = json.loads(cursor.read_text()) if cursor.exists() else {}
    step = metrics["global_step"]
    if step <= logged.get(sink.kind, 0):
        return
    sink.log({f"train/{k}": float(v) for k, v in metrics.items() if k not in ("step", "global_step")}, step)
    write_json_atomic(cursor, {**logged, sink.kind: step})


def log_values(run: Path, config, world, values: dict[str, float], step: int) -> None:
    """Values that no metrics line holds (timings, evaluation) at a global step."""
    sink = tracker(run, config, world)
    if sink.kind != "none":
        sink.log({k: float(v) for k, v in values.items() if v is not None}, step)


def policy_step(policy: Path) -> int:
    """The global optimizer step a policy was trained to (0 for the base model)."""
    provenance = layout.provenance_file(policy)
    return json.loads(provenance.read_text()).get("global_step", 0) if provenance.exists() else 0


def close_all() -> None:
    while _OPEN:
        _, sink = _OPEN.popitem()
        sink.close()
