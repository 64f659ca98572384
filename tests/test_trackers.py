"""Experiment trackers, read back with each tracker's own reader: TensorBoard's EventAccumulator, MLflow's client on
its local store, trackio's local SQLite storage; wandb's offline files (wandb ships no reader for them). The logged
values must equal train_log.jsonl, validation_log.jsonl and results.json exactly. Nothing reaches the network
(conftest.py: offline modes, telemetry off, trackio in a temporary folder)."""

import json
import sys

import pytest
from conftest import write_tiny_data

from peftsum.cli import main
from peftsum.errors import UserError
from peftsum.outputs.trackers import Tracking, require, result_metrics, step_metrics

RUNS = ["lora-seed-0", "lora-seed-1", "prompt-seed-0", "prompt-seed-1"]
# 8 training examples in batches of 4 for 2 epochs: 4 steps; validation at steps 2 and 4.
TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.batch_size", "4", "--train-size", "8", "--data.train_eval_size", "0", "--eval-size", "2",
        "--train.epochs", "2", "--eval.max_new_tokens", "6", "--eval.bootstrap_samples", "20",
        "--prompt.num_virtual_tokens", "4", "--train.checkpoint_every", "0", "--lora.lr", "1e-2",
        "--train.eval_every", "2", "--train.eval_size", "4"]


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    """A comparison of two methods with two seeds each, reported to all four trackers."""
    root = tmp_path_factory.mktemp("trackers")
    data = write_tiny_data(root / "data", n_train=8, n_eval=8)
    out = root / "cmp"
    args = ["compare", "--model", tiny_model_dirs["llama"], "--data", data, "--out", out, "--methods", "lora,prompt",
            "--seeds", "2", *TINY, "--report-to", "tensorboard,mlflow,trackio,wandb"]
    assert main([str(a) for a in args]) == 0
    return out


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(out, name: str) -> tuple[list, list, dict, dict]:
    """(train log rows, validation points, the run's results entry, the baseline) of tracker run `name`."""
    method, seed = name.split("-seed-")
    folder = out / method / f"seed-{seed}"
    results = json.loads((out / "results.json").read_text())
    entry = next(r for r in results["methods"][method]["seed_runs"] if r["seed"] == int(seed))
    return jsonl(folder / "train_log.jsonl"), jsonl(folder / "validation_log.jsonl"), entry, results["baseline"]


def test_tensorboard_event_files_hold_the_logged_numbers(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == RUNS  # a subfolder per method and seed
    for name in RUNS:
        events = EventAccumulator(str(run / "tensorboard" / name), size_guidance={"tensors": 0})
        events.Reload()

        def series(tag):
            return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]

        rows, points, entry, baseline = expected(run, name)
        assert series("train/loss") == [(r["step"], r["loss"]) for r in rows]
        assert series("train/lr") == [(r["step"], r["lr"]) for r in rows]
        assert series("train/tokens_per_s") == [(r["step"], r["tokens_per_s"]) for r in rows]
        assert series("validation/loss") == [(p["step"], p["loss"]) for p in points] and len(points) == 2
        summary = result_metrics(entry, baseline)
        for tag in ("after/eval/loss", "after/eval/rouge1", "after/eval/rougeL_high", "baseline/eval/loss",
                    "params/trainable", "training/tokens_per_s", "training/best_step"):
            assert series(tag) == [(4, summary[tag])], tag
        assert series("after/eval/rouge1")[0][1] == entry["after"]["eval"]["rouge"]["rouge1"]["mean"]
        assert "config/text_summary" in events.Tags()["tensors"]
    # The report goes to each method's last run: the one open when the report that includes it was written.
    events = EventAccumulator(str(run / "tensorboard" / "prompt-seed-1"), size_guidance={"tensors": 0})
    events.Reload()
    report = tensor_util.make_ndarray(events.Tensors("report.md/text_summary")[0].tensor_proto).item().decode()
    assert report == (run / "report.md").read_text()


def test_mlflow_store_holds_an_experiment_with_a_run_per_method_and_seed(run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cmp")  # the comparison's folder name
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(found) == RUNS
    for name, mlflow_run in found.items():
        run_id = mlflow_run.info.run_id
        rows, points, entry, baseline = expected(run, name)
        assert mlflow_run.info.status == "FINISHED"

        def history(key):
            return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

        assert history("train/loss") == [(r["step"], r["loss"]) for r in rows]
        assert history("validation/loss") == [(p["step"], p["loss"]) for p in points]
        metrics = mlflow_run.data.metrics
        for key, value in result_metrics(entry, baseline).items():
            assert metrics[key] == value, key
        assert metrics["after/eval/loss"] == entry["after"]["eval"]["loss"]
        params = mlflow_run.data.params
        assert params["train.seed"] == name[-1] and params["methods"] == f"['{name.split('-')[0]}']"
    artifacts = {f.path for f in client.list_artifacts(found["lora-seed-1"].info.run_id)}
    assert artifacts == {"report.md", "report.html"}
    assert client.list_artifacts(found["lora-seed-0"].info.run_id)  # the report as it stood when that seed ended


def test_trackio_local_project_holds_the_runs(run):
    from trackio.sqlite_storage import SQLiteStorage

    assert sorted(SQLiteStorage.get_runs("cmp")) == RUNS
    for name in RUNS:
        rows, points, entry, baseline = expected(run, name)
        logs = SQLiteStorage.get_logs("cmp", name)
        assert [(e["step"], e["train/loss"]) for e in logs if "train/loss" in e] == \
            [(r["step"], r["loss"]) for r in rows]
        assert [(e["step"], e["validation/loss"]) for e in logs if "validation/loss" in e] == \
            [(p["step"], p["loss"]) for p in points]
        last = {k: v for e in logs for k, v in e.items()}
        assert last["after/eval/rouge1"] == entry["after"]["eval"]["rouge"]["rouge1"]["mean"]
        assert SQLiteStorage.get_run_config("cmp", name)["train"]["seed"] == int(name[-1])


def test_wandb_offline_runs_are_written_to_the_run_folder(run):
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == len(RUNS)
    names = set()
    for folder in folders:
        (log,) = folder.glob("run-*.wandb")
        content = log.read_bytes()
        assert b"train/loss" in content and b"after/eval/rouge1" in content
        names |= {name for name in RUNS if name.encode() in content}
    assert names == set(RUNS)
    assert sum((folder / "files" / "report.md").is_file() for folder in folders) >= 2  # each method's last run


def test_a_missing_tracker_package_is_refused_before_training(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it raises ImportError
    data = write_tiny_data(tmp_path / "data", n_train=8, n_eval=8)
    args = ["compare", "--model", tiny_model_dirs["llama"], "--data", data, "--out", tmp_path / "x", "--methods",
            "lora", *TINY, "--report-to", "tensorboard,wandb"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package: pip install wandb" in err and err.count("\n") == 1
    assert not (tmp_path / "x" / "lora").exists()
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny alone: no SQLite store
    with pytest.raises(UserError, match="needs sqlalchemy, which mlflow-skinny leaves out: pip install mlflow"):
        require(["mlflow"], tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # a server needs neither
    require(["mlflow", "none"], tmp_path)


def test_an_unknown_tracker_is_refused(tiny_model_dirs, tmp_path, capsys):
    args = ["train", "--method", "lora", "--model", tiny_model_dirs["llama"], "--data", tmp_path, "--out",
            tmp_path / "x", "--report-to", "tensorboard,comet"]
    assert main([str(a) for a in args]) == 2
    assert "unknown tracker 'comet' in train.report_to; choose from tensorboard, mlflow, trackio, wandb" in \
        capsys.readouterr().err


class Recorder:
    """A tracker that records the calls it gets."""

    def __init__(self):
        self.calls = []

    def start(self, name, group, config):
        self.calls.append(("start", name, group))

    def log_metrics(self, step, metrics):
        self.calls.append(("metrics", step, metrics))

    def log_summary(self, metrics):
        self.calls.append(("summary", metrics))

    def log_artifact(self, path):
        self.calls.append(("artifact", path.name))

    def finish(self, ok):
        self.calls.append(("finish", ok))


def test_tracking_keeps_one_run_open_and_attaches_what_exists(tmp_path):
    (tmp_path / "report.md").write_text("# r")
    recorder = Recorder()
    with pytest.raises(KeyboardInterrupt):
        with Tracking([recorder], [tmp_path / "report.md", tmp_path / "report.html"]) as tracking:
            tracking.start("a", "g", {})
            tracking.log_step({"step": 1, "epoch": 1, "loss": 2.5, "lr": 0.1}, {"step": 1, "loss": 3.0, "tokens": 7})
            tracking.start("b", "g", {})  # finishes "a" first, with the report that exists
            raise KeyboardInterrupt
    assert recorder.calls == [
        ("start", "a", "g"),
        ("metrics", 1, {"train/loss": 2.5, "train/lr": 0.1, "train/epoch": 1, "validation/loss": 3.0,
                        "validation/tokens": 7}),
        ("artifact", "report.md"), ("finish", True), ("start", "b", "g"), ("finish", False)]
    assert step_metrics({"step": 3, "loss": 1.0}, None) == {"train/loss": 1.0}
    idle = Tracking([], [])  # ranks other than 0, or no tracker named: every call does nothing
    idle.start("a", "g", {})
    idle.log_step({"step": 1, "loss": 1.0}, None)
    idle.finish()
