"""Orchestration: load model and data once, score the untouched model, then train and score each method.

Every method starts from its own copy of the same base weights, with the same data, seed and step budget. Results
are written after each method (results.json, report.md, plots), so a long comparison shows progress on disk.
"""

from __future__ import annotations

import copy
import datetime as dt
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import __version__, adapters
from .config import RunConfig
from .data import Splits, encode_example, load_data
from .evaluate import evaluate
from .files import write_json, write_text
from .methods import Adapted, adapt, untouched
from .models import LoadedModel, compute_dtype, count_parameters, load_model, pick_device, ties_embeddings
from .report import write_report
from .train import train

RUN_CONFIG = "config.yaml"


@dataclass
class Session:
    """What every step of a run shares: the loaded base model, the data, and where computation happens."""

    cfg: RunConfig
    loaded: LoadedModel
    device: torch.device
    dtype: torch.dtype
    progress: bool = True


def open_session(cfg: RunConfig, progress: bool = True) -> Session:
    device = pick_device(cfg.model.device)
    loaded = load_model(cfg.model, seed=cfg.train.seed)
    loaded.model.to(device)
    return Session(cfg, loaded, device, compute_dtype(cfg.model.precision, device), progress)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(session: Session) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(session.device) if session.device.type == "cuda" else None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peftsum": __version__, "platform": platform.platform(), "cpu": cpu_name(), "cores": _cores(),
            "device": str(session.device), "precision": str(session.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "gpu": gpu}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def model_facts(session: Session) -> dict:
    model = session.loaded.model
    total, _ = count_parameters(model)
    return {"name": session.loaded.name, "source": session.loaded.source, "architecture": type(model).__name__,
            "total_params": total, "tied_embeddings": ties_embeddings(model), "random_init": session.cfg.model.random_init}


def fresh_adapted(session: Session, method: str) -> Adapted:
    """A copy of the base model prepared for `method`, seeded so that initial adapter weights are reproducible."""
    torch.manual_seed(session.cfg.train.seed)
    return adapt(copy.deepcopy(session.loaded.model), session.loaded.tokenizer, method, session.cfg)


def plan(session: Session) -> dict:
    """The resource plan: per method, total and trainable parameter counts, without training."""
    methods = {}
    for method in session.cfg.methods:
        methods[method] = fresh_adapted(session, method).parameter_counts()
    return {"model": model_facts(session), "methods": methods}


def score_splits(session: Session, adapted: Adapted, splits: Splits, folder: Path, label: str) -> dict:
    cfg = session.cfg
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, examples in (("train", splits.train_eval), ("eval", splits.eval)):
        out[split] = evaluate(adapted, session.loaded.tokenizer, examples, cfg.data, cfg.eval, session.device,
                              session.dtype, predictions_path=folder / f"predictions_{split}.jsonl",
                              seed=cfg.train.seed, progress=session.progress, desc=f"{label} {split}")
    return out


def train_method(session: Session, method: str, splits: Splits, folder: Path) -> tuple[Adapted, dict]:
    """Train one method into `folder` (weights, config, step log); returns the adapted model and its training facts."""
    cfg = session.cfg
    folder.mkdir(parents=True, exist_ok=True)
    adapted = fresh_adapted(session, method)
    encoded = [encode_example(session.loaded.tokenizer, e, cfg.data, reserved=adapted.virtual_tokens)
               for e in splits.train]
    training = train(adapted, encoded, cfg.train, cfg.method_lr(method), pad_id=session.loaded.tokenizer.pad_token_id,
                     device=session.device, dtype=session.dtype, log_path=folder / "train_log.jsonl",
                     progress=session.progress)
    adapters.save(adapted, folder, session.loaded.source if not cfg.model.random_init else cfg.model.name, cfg)
    method_cfg = copy.deepcopy(cfg)
    method_cfg.methods = [method]
    method_cfg.out = str(folder)
    write_text(folder / RUN_CONFIG, yaml.safe_dump(method_cfg.to_dict(), sort_keys=False))
    return adapted, training


def compare(cfg: RunConfig, progress: bool = True) -> dict:
    """Run the whole comparison into cfg.out and return the results dict (also written as results.json)."""
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    session = open_session(cfg, progress)
    splits = load_data(cfg.data, seed=cfg.train.seed)
    results = {"peftsum_version": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "config": cfg.to_dict(), "environment": environment(session), "model": model_facts(session),
               "data": splits.info, "baseline": None, "methods": {}, "wall_seconds": 0.0}

    def publish():
        results["wall_seconds"] = time.perf_counter() - started
        write_json(out / "results.json", results)
        write_report(results, out)

    if cfg.eval.before:
        results["baseline"] = score_splits(session, untouched(session.loaded.model), splits, out / "baseline", "untouched")
        publish()
    for method in cfg.methods:
        folder = out / method
        adapted, training = train_method(session, method, splits, folder)
        after = score_splits(session, adapted, splits, folder, method)
        results["methods"][method] = {"params": adapted.parameter_counts(), "training": training, "after": after,
                                      "dir": method}
        write_json(folder / "metrics.json", results["methods"][method])
        del adapted
        publish()
    return results
