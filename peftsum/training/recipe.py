"""One method, start to finish: trained into its folder, scored, reported to the trackers, marked finished, its
checkpoints dropped. A recipe in torchtune's sense: one job's phases, named and in order.

`run_one` is that job, and the only one: `peftsum train` runs it once (`train_folder`, which first claims the
folder), `compare` once per method and seed (study/compare.py). A method trained alone and one trained in a
comparison are therefore the same run (same weights, config.yaml, step log and tracker run); they differ only in how
the result is scored and what marks the folder finished:
- in a comparison (`generate=True`), the method is scored as the baselines are (loss and ROUGE of generated
  summaries on both scored subsets, predictions written), and its metrics.json, written last, marks it finished;
- alone, it is scored by its eval loss (no generation) and gets a model card; the weights without checkpoints beside
  them mark it finished (runs.trained_weights).

It lives beside the loop it drives (train.py); unlike the loop, it reaches up to scoring and the outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import RunConfig
from ..core.data import Splits, skipped_note, validation_note
from ..core.models import transformer_blocks
from ..core.prompts import prompt_format, settle
from ..core.session import Session, check_fsdp, environment, fresh_adapted, open_session
from ..evaluation.evaluate import evaluate, mean_loss, validation
from ..infra import distributed, runs
from ..infra.files import make_folder, write_json, write_text
from ..methods import adapters
from ..methods.base import Adapted
from ..outputs.model_card import train_card, write_card
from ..outputs.trackers import Tracking, open_tracking, require, result_metrics, training_metrics
from . import checkpoint
from .train import TrainEnv, train


@dataclass
class MethodRun:
    """A method trained and scored: the model as trained (whole, on every rank) and its results: parameter counts
    (`params`), training facts (`training`), scores after training (`after`) and, in a comparison, its folder
    relative to the comparison (`dir`): its entry in results.json."""

    adapted: Adapted
    result: dict


def print_data_notes(splits: Splits) -> None:
    """Say what loading the data dropped or shared (skipped rows, validation examples that are also scored)."""
    for note in (skipped_note(splits.info), validation_note(splits.info)):
        if note:
            print(note)


def train_folder(cfg: RunConfig, method: str, splits: Splits, folder: Path, *, resume: bool, overwrite: bool,
                 fsdp: bool) -> MethodRun | None:
    """`peftsum train`: `method` trained alone into `folder` (whose lock the caller holds), as one tracker run grouped
    by the folder's name, which gets the model card (train writes no report). None when the folder holds a finished
    run that --resume keeps. With several processes, every rank calls this."""
    if fsdp:
        distributed.on_main(check_fsdp, cfg)
    if distributed.on_main(runs.prepare_train_folder, folder, resume, overwrite):
        return None
    distributed.on_main(require, cfg.train.report_to, folder)
    distributed.on_main(make_folder, folder)
    print_data_notes(splits)
    session = open_session(cfg, fsdp=fsdp)
    with open_tracking(cfg.train.report_to, folder, [folder / runs.MODEL_CARD]) as tracking:
        return run_one(session, method, splits, folder, tracking, name=method, group=folder.resolve().name,
                       generate=False)


def run_one(session: Session, method: str, splits: Splits, folder: Path, tracking: Tracking, *, name: str,
            group: str, generate: bool, baseline: dict | None = None) -> MethodRun:
    """Train `method` into `folder`, score it, report it, and leave the folder finished, with nothing to resume.

    `name` names the tracker run (a '/' becomes '-') and, in a comparison, the folder relative to it; `group` groups
    the tracker runs. With `generate` (a comparison), the method is scored by generating summaries of both scored
    subsets and its metrics.json is written, the tracker run also getting the untouched model's scores (`baseline`);
    without, it is scored by its eval loss and gets its model card. Training continues from the newest checkpoint in
    `folder`, if there is one. Only rank 0 writes.
    """
    tracking.start(name.replace("/", "-"), group, {**session.cfg.to_dict(), "methods": [method]})
    adapted, training = train_method(session, method, splits, folder, on_step=tracking.log_step)
    result = {"params": adapted.parameter_counts(), "training": training}
    if generate:
        result.update(after=score_splits(session, adapted, splits, folder, name), dir=name)
        summary = result_metrics(result, baseline)
    else:
        result["after"] = _eval_loss(session, adapted, splits)
        summary = training_metrics(result["params"], training)
        summary.update({f"after/{split}/loss": scores["loss"] for split, scores in result["after"].items()})
    tracking.log_summary(summary)
    if distributed.is_main():
        if generate:
            write_json(folder / runs.METRICS, result)  # last of the method's files: the folder is finished
        else:
            write_card(folder, train_card(session.cfg, method, result["params"], training, environment(session),
                                          folder))
        checkpoint.remove(folder)  # the final weights are on disk: nothing left to resume
    return MethodRun(adapted, result)


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
    env = TrainEnv(session.device, session.dtype, session.loaded.tokenizer.pad_token_id, folder=folder,
                   run_config=cfg.to_dict(), fsdp=session.fsdp, progress=session.progress)
    training = train(adapted, encoded, cfg.train, cfg.method_lr(method), env, validate=validate, on_step=on_step)
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


def score_splits(session: Session, adapted: Adapted, splits: Splits, folder: Path, label: str) -> dict:
    """Loss and ROUGE of generated summaries on the scored train and eval subsets, predictions written to `folder`."""
    cfg = session.cfg
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, examples in (("train", splits.train_eval), ("eval", splits.eval)):
        out[split] = evaluate(adapted, session.loaded.tokenizer, examples, cfg.data, cfg.eval, session.device,
                              session.dtype, predictions_path=folder / runs.predictions(split),
                              seed=cfg.train.seed, progress=session.progress, desc=f"{label} {split}")
    return out


def _eval_loss(session: Session, adapted: Adapted, splits: Splits) -> dict:
    """{"eval": {"loss", "n"}}: the mean loss on the eval subset (no generation), or {} without one."""
    if not splits.eval:
        return {}
    cfg = session.cfg
    loss, _ = mean_loss(adapted, session.tokenizer, splits.eval, cfg.data, cfg.eval.batch_size, session.device,
                        session.dtype)
    return {"eval": {"loss": loss, "n": len(splits.eval)}}
