"""Orchestration: load model and data once, score the baselines (baselines.py), then train and score each method
(training/recipe.py `run_one`, the job `peftsum train` runs too).

Every method starts from its own copy of the same base weights, with the same data, seed and step budget. Results
are written after each method (results.json, report.md, plots), so a long comparison shows progress on disk.

With `train.eval_every`, each method is validated during training on examples of the eval split kept apart from the
scored ones (`data.validation_subset`); with `train.report_to`, every method and seed is a run of each named
experiment tracker (trackers.py), fed the numbers as they are computed.

A comparison survives interruption: each baseline's scores (`baseline/metrics.json` for the untouched model,
`baselines/<name>/metrics.json`) and each finished method's (`<method>/metrics.json`, written last) are read back
instead of recomputed, and a method interrupted while training continues from its newest checkpoint. A finished run
is never overwritten without `--overwrite`.

Started as several processes (torchrun, accelerate launch), every rank runs the same steps on its share of the work
(see distributed.py) and only rank 0 touches the output folder. With FSDP (full fine-tuning only), the base model
stays on the CPU and each method's copy is sharded over the ranks for training, then gathered whole for scoring.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Callable

from .. import __version__
from ..config import RunConfig
from ..core.data import Splits, load_data
from ..core.prompts import prompt_format
from ..core.session import Session, base_copy, check_fsdp, environment, fresh_adapted, model_facts, open_session
from ..infra import distributed, runs
from ..infra.files import make_folder, read_json, write_json
from ..methods.base import Adapted, untouched
from ..outputs.model_card import write_cards
from ..outputs.report import write_report
from ..outputs.trackers import Tracking, group_name, open_tracking, require
from ..training.recipe import print_data_notes, run_one
from . import baselines
from .analysis import analyze, seed_summary
from .results import SCHEMA_VERSION, ZERO_SHOT


def plan(session: Session) -> dict:
    """The resource plan: per method, total and trainable parameter counts, without training."""
    methods = {}
    for method in session.cfg.methods:
        methods[method] = fresh_adapted(session, method).parameter_counts()
    return {"model": model_facts(session), "methods": methods}


def run_method(session: Session, method: str, splits: Splits, out: Path, folder_name: str, tracking: Tracking,
               baseline: dict | None) -> dict | None:
    """Train and score `method` into out/folder_name, or read back its scores if that folder finished earlier.

    Returns the method's results (None on ranks other than 0 when read back: only rank 0 writes results). A method
    trained here is a tracker run (named after its folder), left open for the report that will include it.
    """
    folder = out / folder_name
    if distributed.broadcast_object(runs.finished(folder)):  # rank 0 decides: all ranks take one branch
        print(f"{folder_name}: finished earlier; results read back from {folder / runs.METRICS}")
        return read_json(folder / runs.METRICS) if distributed.is_main() else None
    return run_one(session, method, splits, folder, tracking, name=folder_name, group=group_name(out), generate=True,
                   baseline=baseline).result


def run_seeds(session: Session, method: str, splits: Splits, out: Path, tracking: Tracking,
              baseline: dict | None) -> dict | None:
    """`method` trained once per seed (train.seed, train.seed + 1, ...) into out/method/seed-S, each from its own
    initialisation and batch order on the same data; the first seed's run stands for the method, with the runs of
    every seed (`seed_runs`) and their mean and spread (`across_seeds`) beside it."""
    base = session.cfg.train.seed
    seed_runs = []
    for seed in range(base, base + session.cfg.seeds):
        cfg = copy.deepcopy(session.cfg)
        cfg.train.seed = seed  # the data subset stays drawn with the base seed: every seed sees the same examples
        result = run_method(dataclasses.replace(session, cfg=cfg), method, splits, out, runs.seed_folder(method, seed),
                            tracking, baseline)
        seed_runs.append(result and {"seed": seed, **result})
    if not distributed.is_main():
        return None
    first = seed_runs[0]
    return {"params": first["params"], "training": first["training"], "after": first["after"], "dir": first["dir"],
            "seed_runs": seed_runs, "across_seeds": seed_summary(seed_runs)}


def compare(cfg: RunConfig, progress: bool = True, resume: bool = False, overwrite: bool = False,
            fsdp: bool = False) -> dict:
    """Run the whole comparison into cfg.out and return the results dict (also written as results.json).

    Finished parts of a previous run of the same comparison in cfg.out are read back, not recomputed. With several
    processes, every rank calls this; rank 0 alone reads and writes the folder's state and results.
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    if fsdp:
        distributed.on_main(check_fsdp, cfg)
    distributed.on_main(runs.prepare_compare_folder, out, cfg, resume, overwrite)
    distributed.on_main(require, cfg.train.report_to, out)
    # Before the model: bad data is refused in seconds.
    splits = load_data(cfg.data, seed=cfg.train.seed, validation_size=cfg.train.validation_size)
    print_data_notes(splits)
    distributed.on_main(make_folder, out)
    session = open_session(cfg, progress, fsdp)
    results = _new_results(session, splits)
    main = distributed.is_main()

    def publish():  # results.json, the report and the model cards, after each baseline and method
        results["wall_seconds"] = time.perf_counter() - started
        if main:
            results["analysis"] = analyze(results)
            write_json(out / runs.RESULTS, results)
            write_report(results, out)
            write_cards(results, out)

    if main:
        # Claims the folder for this configuration before anything else is written.
        write_json(out / runs.RESULTS, {**results, "analysis": analyze(results)})
    _score_baselines(session, splits, out, results, publish)
    with open_tracking(cfg.train.report_to, out, [out / runs.REPORT, out / runs.REPORT_HTML]) as tracking:
        for method in cfg.methods:
            if cfg.seeds == 1:
                result = run_method(session, method, splits, out, method, tracking, results["baseline"])
            else:
                result = run_seeds(session, method, splits, out, tracking, results["baseline"])
            results["methods"][method] = result
            publish()
            tracking.finish()  # the method's (last) run gets the report that includes it
    distributed.barrier()  # every file is written before any process returns
    return results


def _new_results(session: Session, splits: Splits) -> dict:
    """results.json before anything is scored: what the comparison is (versions, config, environment, model, data,
    prompt), with empty baselines and methods."""
    cfg = session.cfg
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    fmt = prompt_format(session.tokenizer, cfg.data)
    return {"schema_version": SCHEMA_VERSION, "peftsum_version": __version__, "created": created,
            "config": cfg.to_dict(), "environment": environment(session), "model": model_facts(session),
            "data": splits.info, "prompt": {**fmt.describe(), "chosen": cfg.data.format}, "baseline": None,
            "baselines": {}, "methods": {}, "wall_seconds": 0.0}


def _score_baselines(session: Session, splits: Splits, out: Path, results: dict, publish: Callable[[], None]) -> None:
    """Score each planned baseline into `results` (rank 0's), publishing after each. One copy of the base model serves
    every baseline that prompts it; it is let go on return, as training does not need it."""
    model = None

    def untouched_model() -> Adapted:
        nonlocal model
        model = model or untouched(base_copy(session), session.dtype)
        return model

    for baseline in baselines.plan(session.cfg, session.tokenizer):
        scored = baselines.score(session, baseline, splits, out, untouched_model)
        if distributed.is_main():
            results["baselines"][baseline.name] = scored
            if baseline.name == ZERO_SHOT:
                results["baseline"] = {"train": scored["train"], "eval": scored["eval"]}
        publish()
