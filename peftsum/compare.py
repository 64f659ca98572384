"""Orchestration: load model and data once, score the untouched model, then train and score each method.

Every method starts from its own copy of the same base weights, with the same data, seed and step budget. Results
are written after each method (results.json, report.md, plots), so a long comparison shows progress on disk.

A comparison survives interruption: the untouched model's scores (`baseline/metrics.json`) and each finished
method's (`<method>/metrics.json`, written last) are read back instead of recomputed, and a method interrupted while
training continues from its newest checkpoint. A finished run is never overwritten without `--overwrite`.

Started as several processes (torchrun, accelerate launch), every rank runs the same steps on its share of the work
(see distributed.py) and only rank 0 touches the output folder. With FSDP (full fine-tuning only), the base model
stays on the CPU and each method's copy is sharded over the ranks for training, then gathered whole for scoring.
"""

from __future__ import annotations

import copy
import datetime as dt
import platform
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import __version__, adapters, checkpoint, distributed
from .config import METHODS, RunConfig
from .data import Splits, encode_example, load_data, skipped_note
from .errors import UserError
from .evaluate import evaluate
from .files import make_folder, read_json, write_json, write_text
from .methods import Adapted, adapt, untouched
from .models import (LoadedModel, compute_dtype, count_parameters, load_model, pick_device, ties_embeddings,
                     transformer_blocks)
from .model_card import write_cards
from .report import seed_summary, write_report
from .train import train

RUN_CONFIG = "config.yaml"
RESULTS = "results.json"
METRICS = "metrics.json"  # a method's (or the baseline's) scores; written last, so it marks the folder finished


@dataclass
class Session:
    """What every step of a run shares: the loaded base model, the data, and where computation happens."""

    cfg: RunConfig
    loaded: LoadedModel
    device: torch.device
    dtype: torch.dtype
    progress: bool = True
    fsdp: bool = False  # full fine-tuning sharded over the processes; the base model then stays on the CPU


def open_session(cfg: RunConfig, progress: bool = True, fsdp: bool = False) -> Session:
    choice = distributed.device_choice(cfg.model.device)
    device = distributed.init(choice) or pick_device(choice)
    with distributed.main_first():  # rank 0 fills the caches (converted model, downloads) before the others read
        loaded = load_model(cfg.model, seed=cfg.train.seed)
    check_context(cfg, loaded.model)
    if not fsdp:
        loaded.model.to(device)
    return Session(cfg, loaded, device, compute_dtype(cfg.model.precision, device),
                   progress and distributed.is_main(), fsdp)


def check_fsdp(cfg: RunConfig) -> None:
    """FSDP is for full fine-tuning, across several processes; refuse anything else in one line."""
    if cfg.methods != ["finetune"] or not cfg.finetune.all:
        raise UserError("FSDP shards full fine-tuning only: run the finetune method alone with --finetune.all true "
                        "(LoRA, prompt tuning and partial fine-tuning train few weights: run them without FSDP)")
    if not distributed.launched():
        raise UserError("FSDP shards the model over several processes: start peftsum with torchrun or "
                        "accelerate launch (see README)")


def check_context(cfg: RunConfig, model) -> None:
    """Refuse lengths beyond the model's positions, which would crash (GPT-2) or silently degrade (RoPE) later."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not context:
        return
    d = cfg.data
    if d.max_length > context:
        raise UserError(f"data.max_length ({d.max_length}) exceeds the context of model {cfg.model.name!r} "
                        f"({context} tokens); lower --max-length")
    prompt = d.max_length - d.max_summary_tokens - 1
    if prompt + cfg.eval.max_new_tokens > context:
        raise UserError(f"generated summaries could run past the context of model {cfg.model.name!r} ({context} "
                        f"tokens): prompts of up to {prompt} tokens plus eval.max_new_tokens "
                        f"({cfg.eval.max_new_tokens}); lower one of them")


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
            "threads": torch.get_num_threads(), "gpu": gpu,
            **({"processes": distributed.world(), "fsdp": session.fsdp} if distributed.world() > 1 else {})}


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


def base_copy(session: Session):
    """A copy of the untouched base model on the session's device."""
    return copy.deepcopy(session.loaded.model).to(session.device)


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
                              session.dtype, predictions_path=folder / f"predictions_{split}.jsonl",
                              seed=cfg.train.seed, progress=session.progress, desc=f"{label} {split}")
    return out


def train_method(session: Session, method: str, splits: Splits, folder: Path) -> tuple[Adapted, dict]:
    """Train one method into `folder` (weights, config, step log); returns the adapted model and its training facts.

    Training continues from the newest checkpoint in `folder/checkpoints`, if there is one.
    """
    cfg = session.cfg
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    adapted = fresh_adapted(session, method)
    encoded = [encode_example(session.loaded.tokenizer, e, cfg.data, reserved=adapted.virtual_tokens)
               for e in splits.train]
    if session.fsdp:
        distributed.fully_shard_model(adapted.model, transformer_blocks(adapted.model), session.device)
        adapted.trainable = [p for p in adapted.model.parameters() if p.requires_grad]
    training = train(adapted, encoded, cfg.train, cfg.method_lr(method), pad_id=session.loaded.tokenizer.pad_token_id,
                     device=session.device, dtype=session.dtype, log_path=folder / "train_log.jsonl",
                     progress=session.progress, run_dir=folder, run_config=cfg.to_dict(), fsdp=session.fsdp)
    if session.fsdp:
        adapted = gathered(session, method, adapted)
    if distributed.is_main():
        adapters.save(adapted, folder, session.loaded.source if not cfg.model.random_init else cfg.model.name, cfg)
        method_cfg = copy.deepcopy(cfg)
        method_cfg.methods = [method]
        method_cfg.out = str(folder)
        write_text(folder / RUN_CONFIG, yaml.safe_dump(method_cfg.to_dict(), sort_keys=False))
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


# ---------------------------------------------------------------- finished, unfinished and overwritten runs

# What peftsum writes into a method folder (and nothing else is deleted by --overwrite).
METHOD_FILES = (METRICS, RUN_CONFIG, "README.md", "train_log.jsonl", "predictions_train.jsonl",
                "predictions_eval.jsonl", adapters.ADAPTER_WEIGHTS, adapters.ADAPTER_CONFIG, adapters.FINETUNED_WEIGHTS)
RUN_FILES = (RESULTS, "report.md", "report.html", "loss_curves.png", "rouge.png")
# Settings that may differ when a comparison resumes: where it goes, which methods run, how often it checkpoints.
RESUMABLE_CHANGES = ("out", "methods", "train.checkpoint_every", "train.keep_checkpoints")


def clear_method(folder: Path) -> None:
    """Remove a previous run's results and checkpoints from a method folder (for --overwrite)."""
    if not folder.is_dir():
        return
    checkpoint.remove(folder)
    for name in METHOD_FILES:
        (folder / name).unlink(missing_ok=True)
    for seed_folder in folder.glob("seed-*"):  # the runs of a multi-seed comparison
        clear_method(seed_folder)


def _refuse(what: str) -> UserError:
    return UserError(f"{what}; pass --overwrite to replace it (or --resume to reuse what is finished)")


def trained_weights(folder: Path) -> Path | None:
    """The final weights of a finished `train` run in `folder`, if any (checkpoints left means not finished)."""
    for name in (adapters.ADAPTER_WEIGHTS, adapters.FINETUNED_WEIGHTS):
        if (folder / name).is_file() and checkpoint.latest(folder) is None:
            return folder / name
    return None


def prepare_train_folder(folder: Path, resume: bool, overwrite: bool) -> bool:
    """Decide what `train` does with `folder`; True when a finished run is there and --resume asks to keep it."""
    if overwrite:
        clear_method(folder)
        return False
    finished = trained_weights(folder)
    if finished is not None and not resume:
        raise _refuse(f"{folder} already holds a finished run ({finished.name})")
    return finished is not None


def prepare_compare_folder(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Clear the folder (--overwrite), or check that what it holds belongs to this comparison."""
    if overwrite and out.is_dir():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in ("baseline", *METHODS):
            clear_method(out / name)
    if overwrite or not (out / RESULTS).is_file():
        return
    previous = read_json(out / RESULTS)
    changes = [c for c in checkpoint.config_changes(previous.get("config", {}), cfg.to_dict())
               if c.split(":")[0] not in RESUMABLE_CHANGES]
    if changes:
        raise UserError(f"{out} holds a comparison with other settings ({'; '.join(changes[:3])}); pass --overwrite "
                        f"to replace it, or choose another --out")
    done = set(previous.get("methods", {}))
    finished = set(cfg.methods) <= done and (previous.get("baseline") is not None or not cfg.eval.before)
    if finished and not resume:
        raise _refuse(f"{out} already holds a finished comparison ({RESULTS})")


def run_method(session: Session, method: str, splits: Splits, out: Path, folder_name: str) -> dict | None:
    """Train and score `method` into out/folder_name, or read back its scores if that folder finished earlier.

    Returns the method's results (None on ranks other than 0 when read back: only rank 0 writes results).
    """
    folder = out / folder_name
    if distributed.broadcast_object((folder / METRICS).is_file()):  # rank 0 decides: all ranks take one branch
        print(f"{folder_name}: finished earlier; results read back from {folder / METRICS}")
        return read_json(folder / METRICS) if distributed.is_main() else None
    adapted, training = train_method(session, method, splits, folder)
    after = score_splits(session, adapted, splits, folder, folder_name)
    result = {"params": adapted.parameter_counts(), "training": training, "after": after, "dir": folder_name}
    if distributed.is_main():
        write_json(folder / METRICS, result)
        checkpoint.remove(folder)  # the final weights and scores are on disk: nothing left to resume
    return result


def run_seeds(session: Session, method: str, splits: Splits, out: Path) -> dict | None:
    """`method` trained once per seed (train.seed, train.seed + 1, ...) into out/method/seed-S, each from its own
    initialisation and batch order on the same data; the first seed's run stands for the method, with the runs of
    every seed (`seed_runs`) and their mean and spread (`across_seeds`) beside it."""
    base = session.cfg.train.seed
    runs = []
    for seed in range(base, base + session.cfg.seeds):
        cfg = copy.deepcopy(session.cfg)
        cfg.train.seed = seed  # the data subset stays drawn with the base seed: every seed sees the same examples
        result = run_method(dataclasses.replace(session, cfg=cfg), method, splits, out, f"{method}/seed-{seed}")
        runs.append(result and {"seed": seed, **result})
    if not distributed.is_main():
        return None
    first = runs[0]
    return {"params": first["params"], "training": first["training"], "after": first["after"], "dir": first["dir"],
            "seed_runs": runs, "across_seeds": seed_summary(runs)}


def compare(cfg: RunConfig, progress: bool = True, resume: bool = False, overwrite: bool = False,
            fsdp: bool = False) -> dict:
    """Run the whole comparison into cfg.out and return the results dict (also written as results.json).

    Finished parts of a previous run of the same comparison in cfg.out are read back, not recomputed. With several
    processes, every rank calls this; rank 0 alone reads and writes the folder's state and results.
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    distributed.init(distributed.device_choice(cfg.model.device))
    if fsdp:
        distributed.on_main(check_fsdp, cfg)
    distributed.on_main(prepare_compare_folder, out, cfg, resume, overwrite)
    splits = load_data(cfg.data, seed=cfg.train.seed)  # before the model: bad data is refused in seconds
    note = skipped_note(splits.info)
    if note:
        print(note)
    distributed.on_main(make_folder, out)
    session = open_session(cfg, progress, fsdp)
    results = {"peftsum_version": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "config": cfg.to_dict(), "environment": environment(session), "model": model_facts(session),
               "data": splits.info, "baseline": None, "methods": {}, "wall_seconds": 0.0}

    main = distributed.is_main()

    def publish():
        results["wall_seconds"] = time.perf_counter() - started
        if main:
            write_json(out / RESULTS, results)
            write_report(results, out)
            write_cards(results, out)

    if main:
        write_json(out / RESULTS, results)  # claims the folder for this configuration before anything else is written
    if cfg.eval.before:
        scores = out / "baseline" / METRICS
        if distributed.broadcast_object(scores.is_file()):  # rank 0 decides: every rank must take the same branch
            results["baseline"] = read_json(scores) if main else None  # only rank 0 needs results (and the folder)
            print(f"untouched model: scores read back from {scores}")
        else:
            results["baseline"] = score_splits(session, untouched(base_copy(session), session.dtype), splits,
                                               out / "baseline", "untouched")
            if main:
                write_json(scores, results["baseline"])
        publish()
    for method in cfg.methods:
        if cfg.seeds == 1:
            results["methods"][method] = run_method(session, method, splits, out, method)
        else:
            results["methods"][method] = run_seeds(session, method, splits, out)
        publish()
    distributed.barrier()  # every file is written before any process returns
    return results
