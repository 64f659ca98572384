"""Orchestration: load model and data once, score the baselines (baselines.py), then train and score each method.

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

import torch
import yaml

from .. import __version__
from ..config import RunConfig
from ..core.data import Splits, load_data, skipped_note, validation_note
from ..core.models import transformer_blocks
from ..core.prompts import prompt_format, settle
from ..core.session import Session, base_copy, check_fsdp, environment, fresh_adapted, model_facts, open_session
from ..evaluation.evaluate import evaluate, validation
from ..infra import distributed, runs
from ..infra.files import make_folder, read_json, write_json, write_text
from ..methods import adapters
from ..methods.base import Adapted, untouched
from ..outputs.model_card import write_cards
from ..outputs.report import write_report
from ..outputs.trackers import Tracking, group_name, open_tracking, require, result_metrics
from ..training import checkpoint
from ..training.train import train
from . import baselines
from .analysis import analyze, seed_summary
from .results import SCHEMA_VERSION, ZERO_SHOT


def plan(session: Session) -> dict:
    """The resource plan: per method, total and trainable parameter counts, without training."""
    methods = {}
    for method in session.cfg.methods:
        methods[method] = fresh_adapted(session, method).parameter_counts()
    return {"model": model_facts(session), "methods": methods}


def score_splits(session: Session, adapted: Adapted, splits: Splits, folder: Path, label: str) -> dict:
    cfg = session.cfg
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, examples in (("train", splits.train_eval), ("eval", splits.eval)):
        out[split] = evaluate(adapted, session.loaded.tokenizer, examples, cfg.data, cfg.eval, session.device,
                              session.dtype, predictions_path=folder / runs.predictions(split),
                              seed=cfg.train.seed, progress=session.progress, desc=f"{label} {split}")
    return out


def train_method(session: Session, method: str, splits: Splits, folder: Path,
                 on_step=None) -> tuple[Adapted, dict]:
    """Train one method into `folder` (weights, config, step log); returns the adapted model and its training facts.

    Training continues from the newest checkpoint in `folder/checkpoints`, if there is one. With train.eval_every,
    the loop validates on `splits.validation`; `on_step` gets each log row (see train.train).
    """
    cfg = session.cfg
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    adapted = fresh_adapted(session, method)
    fmt = prompt_format(session.tokenizer, cfg.data)
    encoded = [fmt.example(e, cfg.data, reserved=adapted.virtual_tokens) for e in splits.train]
    if session.fsdp:
        distributed.fully_shard_model(adapted.model, transformer_blocks(adapted.model), session.device)
        adapted.trainable = [p for p in adapted.model.parameters() if p.requires_grad]
    validate = None
    if cfg.train.eval_every:
        validate = validation(session.tokenizer, splits.validation, cfg.data, cfg.eval, session.device, session.dtype,
                              rouge=cfg.train.eval_rouge)
    training = train(adapted, encoded, cfg.train, cfg.method_lr(method), pad_id=session.loaded.tokenizer.pad_token_id,
                     device=session.device, dtype=session.dtype, log_path=folder / runs.TRAIN_LOG,
                     progress=session.progress, run_dir=folder, run_config=cfg.to_dict(), fsdp=session.fsdp,
                     validate=validate, on_step=on_step)
    if session.fsdp:
        adapted = gathered(session, method, adapted)
    if distributed.is_main():
        adapters.save(adapted, folder, session.loaded.source if not cfg.model.random_init else cfg.model.name, cfg)
        method_cfg = copy.deepcopy(cfg)
        method_cfg.methods = [method]
        method_cfg.out = str(folder)
        settle(method_cfg.data, fmt)
        write_text(folder / runs.RUN_CONFIG, yaml.safe_dump(method_cfg.to_dict(), sort_keys=False))
    return adapted, training


def gathered(session: Session, method: str, sharded: Adapted) -> Adapted:
    """The FSDP-trained model whole, on every rank's device: what saving and (sharded) scoring need."""
    full = {name: distributed.full_tensor(p) for name, p in sharded.model.named_parameters()}  # all ranks, in order
    whole = fresh_adapted(session, method)
    with torch.no_grad():
        for name, p in whole.model.named_parameters():
            p.copy_(full[name])
    whole.model.to(session.device)
    whole.trainable = [p for p in whole.model.parameters() if p.requires_grad]
    return whole


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
    tracking.start(folder_name.replace("/", "-"), group_name(out), {**session.cfg.to_dict(), "methods": [method]})
    adapted, training = train_method(session, method, splits, folder, on_step=tracking.log_step)
    after = score_splits(session, adapted, splits, folder, folder_name)
    result = {"params": adapted.parameter_counts(), "training": training, "after": after, "dir": folder_name}
    tracking.log_summary(result_metrics(result, baseline))
    if distributed.is_main():
        write_json(folder / runs.METRICS, result)
        checkpoint.remove(folder)  # the final weights and scores are on disk: nothing left to resume
    return result


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
    for note in (skipped_note(splits.info), validation_note(splits.info)):
        if note:
            print(note)
    distributed.on_main(make_folder, out)
    session = open_session(cfg, progress, fsdp)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    fmt = prompt_format(session.tokenizer, cfg.data)
    results = {"schema_version": SCHEMA_VERSION, "peftsum_version": __version__, "created": created,
               "config": cfg.to_dict(), "environment": environment(session), "model": model_facts(session),
               "data": splits.info, "prompt": {**fmt.describe(), "chosen": cfg.data.format}, "baseline": None,
               "baselines": {}, "methods": {}, "wall_seconds": 0.0}

    main = distributed.is_main()

    def publish():
        results["wall_seconds"] = time.perf_counter() - started
        if main:
            results["analysis"] = analyze(results)
            write_json(out / runs.RESULTS, results)
            write_report(results, out)
            write_cards(results, out)

    if main:
        # Claims the folder for this configuration before anything else is written.
        write_json(out / runs.RESULTS, {**results, "analysis": analyze(results)})
    model = None

    def untouched_model() -> Adapted:  # one copy of the base model for every baseline that prompts it
        nonlocal model
        model = model or untouched(base_copy(session), session.dtype)
        return model

    for baseline in baselines.plan(cfg, session.tokenizer):
        scored = baselines.score(session, baseline, splits, out, untouched_model)
        if main:
            results["baselines"][baseline.name] = scored
            if baseline.name == ZERO_SHOT:
                results["baseline"] = {"train": scored["train"], "eval": scored["eval"]}
        publish()
    model = None  # the baselines' copy of the base model is not needed for training
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
