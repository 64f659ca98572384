"""Experiment trackers (`train.report_to`, `--report-to`): TensorBoard, MLflow, trackio and Weights & Biases.

Compute first, log second: a tracker receives finished numbers only — each row the training loop appended to its
log (with that step's validation point, through `train`'s `on_step`), a method's results as results.json holds them,
the report files — and never computes anything. One tracker run per method and seed, named after its folder
(`lora`, `lora-seed-1`) and grouped by the comparison (its output folder's name):

- tensorboard: event files in `<out>/tensorboard/<run>/` (scalars in double precision; report.md as text)
- mlflow: an experiment per comparison, a run per method and seed, in `MLFLOW_TRACKING_URI` or else the local
  SQLite store `<out>/mlflow.db` (artifacts in `<out>/mlartifacts/`); MLflow 3 keeps the plain-file store
  (`file:./mlruns`) in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set
- trackio: its local mode (a project per comparison, stored where trackio keeps them: TRACKIO_DIR)
- wandb: offline unless WANDB_MODE says otherwise (`wandb sync <out>/wandb/offline-run-*` uploads later), group =
  the comparison, project WANDB_PROJECT or "peftsum"

Each package is imported only when its tracker is named; `require` says in one line which one to install. Only
rank 0 logs: on every other rank `open_tracking` returns a tracking with no trackers. One tracker run is open at a
time (trackio finishes the previous run when a new one starts); a method's run stays open until the report that
includes it is written (`Tracking.finish` attaches it), or the next run starts. A method resumed after an
interruption starts a new tracker run that receives its whole history again (the loop replays the restored rows);
methods finished before a resume are not logged again.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import yaml

from ..errors import UserError

# What results.json's training facts hold that a tracker shows as one number each.
TRAINING_FACTS = ("steps", "seconds", "tokens", "tokens_per_s", "epochs_completed", "peak_memory_mb", "best_step",
                  "weights_step", "stopped_early")


class Tracker(Protocol):
    """One backend. `start` opens a run, `finish` closes it; the other calls log into the open run."""

    def start(self, name: str, group: str, config: dict) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_summary(self, metrics: dict[str, float]) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def finish(self, ok: bool) -> None: ...


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """{'train.lr': 0.1, ...} from nested sections (for trackers whose parameters are flat)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------- the backends


class TensorBoard:
    """Event files in `<out>/tensorboard/<run>/`, one folder per run (the comparison is the parent folder)."""

    def __init__(self, out: Path):
        self.root = Path(out) / "tensorboard"
        self.writer, self.step = None, 0

    def start(self, name: str, group: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)  # a resumed method logs its whole history again
        self.writer, self.step = SummaryWriter(str(folder)), 0
        self.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():  # double precision: the event files hold the numbers results.json holds
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
        self.step = step

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics(self.step, metrics)  # TensorBoard has no summaries: the numbers at the run's last step

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".md":  # TensorBoard holds no files, but renders markdown text
            self.writer.add_text(path.name, path.read_text(encoding="utf-8"))

    def finish(self, ok: bool) -> None:
        self.writer.close()


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # markdown code: TensorBoard keeps the layout


def mlflow_uri(out: Path) -> str:
    """MLFLOW_TRACKING_URI, else the comparison's own local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


class MLflow:
    """An experiment per comparison, a run per method and seed (MlflowClient: no global active run)."""

    def __init__(self, out: Path):
        self.uri = mlflow_uri(out)
        local = "MLFLOW_TRACKING_URI" not in os.environ
        self.artifacts = (Path(out) / "mlartifacts").resolve().as_uri() if local else None
        self.client, self.run_id, self.step = None, None, 0

    def start(self, name: str, group: str, config: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(group)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(group, artifact_location=self.artifacts))
        self.run_id, self.step = self.client.create_run(experiment_id, run_name=name).info.run_id, 0
        params = [Param(key, str(value)) for key, value in flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        self.step = step

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics(self.step, metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


class Trackio:
    """trackio's local mode: project = the comparison, a run per method and seed."""

    def __init__(self, out: Path):
        self.run, self.step = None, 0

    def start(self, name: str, group: str, config: dict) -> None:
        import trackio

        self.run = trackio.init(project=group, name=name, group=group, config=config, embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)
        self.step = 0

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)
        self.step = step

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=self.step)

    def log_artifact(self, path: Path) -> None:
        self.run.log_artifact(path)

    def finish(self, ok: bool) -> None:
        self.run.finish()


class Wandb:
    """Weights & Biases, offline unless WANDB_MODE says otherwise; files in `<out>/wandb/`."""

    def __init__(self, out: Path):
        self.dir, self.run = Path(out), None

    def start(self, name: str, group: str, config: dict) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "peftsum"), name=name, group=group,
                              config=config, dir=str(self.dir), mode=os.environ.get("WANDB_MODE", "offline"))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "trackio": Trackio, "wandb": Wandb}  # config.TRACKERS


# ---------------------------------------------------------------- checking and opening


def named(report_to: list[str]) -> list[str]:
    """The trackers asked for, in order, without "none" or repeats."""
    return [name for name in dict.fromkeys(report_to) if name != "none"]


def require(report_to: list[str], out: Path) -> None:
    """Refuse, in one line naming the package to install, a tracker whose package is missing (before training)."""
    for name in named(report_to):
        try:
            importlib.import_module(name)  # each tracker's package has its name
        except ImportError:
            raise UserError(f"--report-to {name} needs the {name} package: pip install {name}") from None
        if name == "mlflow" and mlflow_uri(out).startswith("sqlite:"):
            for package in ("sqlalchemy", "alembic"):
                try:
                    importlib.import_module(package)
                except ImportError:
                    raise UserError(f"MLflow's local store ({mlflow_uri(out)}) needs {package}, which mlflow-skinny "
                                    f"leaves out: pip install mlflow (or set MLFLOW_TRACKING_URI to a tracking "
                                    f"server)") from None


class Tracking:
    """The named trackers as one (a fan-out), with at most one tracker run open; `artifacts` are the files attached
    to a run when it finishes (those that exist by then). With no trackers every call does nothing."""

    def __init__(self, trackers: list[Tracker], artifacts: list[Path]):
        self.trackers, self.artifacts, self.open = trackers, artifacts, False

    def start(self, name: str, group: str, config: dict) -> None:
        self.finish()
        for tracker in self.trackers:
            try:
                tracker.start(name, group, config)
            except Exception as exc:  # each tracker raises its own types (no login, a server down, a bad URI)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"{type(tracker).__name__.lower()}: cannot start a tracker run: {first}") from None
        self.open = bool(self.trackers)

    def log_step(self, row: dict, point: dict | None) -> None:
        """The training loop's `on_step`: a log row and that step's validation point."""
        if self.open:
            for tracker in self.trackers:
                tracker.log_metrics(row["step"], step_metrics(row, point))

    def log_summary(self, metrics: dict[str, float]) -> None:
        if self.open:
            for tracker in self.trackers:
                tracker.log_summary(metrics)

    def finish(self, ok: bool = True) -> None:
        """Attach the artifacts that exist and close the open run (if any)."""
        if not self.open:
            return
        self.open = False
        for tracker in self.trackers:
            if ok:
                for path in self.artifacts:
                    if path.is_file():
                        tracker.log_artifact(path)
            tracker.finish(ok)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.finish(ok=kind is None)


def open_tracking(report_to: list[str], out: Path, artifacts: list[Path]) -> Tracking:
    """The trackers of `report_to`, writing their local files under `out`; none on ranks other than 0."""
    from ..infra import distributed

    if not distributed.is_main():
        return Tracking([], [])
    return Tracking([BACKENDS[name](Path(out)) for name in named(report_to)], artifacts)


def group_name(out: Path) -> str:
    """The name a comparison's runs are grouped by: its output folder's name."""
    return Path(out).resolve().name


# ---------------------------------------------------------------- finished numbers as tracker metrics


def step_metrics(row: dict, point: dict | None) -> dict[str, float]:
    """A training log row (and the validation point of its step) as tracker metrics."""
    metrics = {f"train/{key}": row[key] for key in ("loss", "lr", "tokens_per_s", "epoch") if key in row}
    if point is not None:
        metrics.update({f"validation/{key}": value for key, value in point.items() if key not in ("step", "epoch")})
    return metrics


def split_metrics(prefix: str, scores: dict) -> dict[str, float]:
    """One scored split (results.json's loss, ROUGE mean and 95% interval) as `prefix/loss`, `prefix/rouge1`, ..."""
    metrics = {f"{prefix}/loss": scores["loss"]}
    for key, interval in scores["rouge"].items():
        metrics.update({f"{prefix}/{key}": interval["mean"], f"{prefix}/{key}_low": interval["low"],
                        f"{prefix}/{key}_high": interval["high"]})
    return metrics


def result_metrics(result: dict, baseline: dict | None) -> dict[str, float]:
    """A method's results (its entry in results.json) as tracker metrics: after-training scores per split, the
    untouched model's, parameter counts and training facts."""
    metrics: dict[str, float] = {}
    for prefix, scores in (("after", result["after"]), ("baseline", baseline or {})):
        for split, split_scores in scores.items():
            if split_scores:
                metrics.update(split_metrics(f"{prefix}/{split}", split_scores))
    metrics.update(training_metrics(result["params"], result["training"]))
    return metrics


def training_metrics(params: dict, training: dict) -> dict[str, float]:
    """Parameter counts and the training facts of results.json as tracker metrics."""
    metrics = {f"params/{key}": float(value) for key, value in params.items() if isinstance(value, (int, float))}
    metrics.update({f"training/{key}": float(training[key]) for key in TRAINING_FACTS
                    if training.get(key) is not None})
    return metrics
