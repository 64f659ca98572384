"""The run folder: every file name peftsum writes, and what a folder's contents mean (finished, resumable, replaced).

A comparison (`compare`, `--out`) holds `results.json`, `report.md` and the charts, a `baseline/` folder for the
untouched model (zero-shot in the run's prompt format), `baselines/<name>/` for the other baselines (lead-k, few-shot,
zero-shot in the other format) and one folder per method (`<method>/`, or `<method>/seed-<s>/` per seed). A method
folder (also what `train` writes) holds the trained weights (methods/: each method names its file), `config.yaml`
(the exact settings, which `summarize`, `evaluate` and `export` rebuild the run from), `train_log.jsonl` (and
`validation_log.jsonl` with validation during training), the predictions and `metrics.json`, written last: a folder
with `metrics.json` is finished.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import METHODS, RunConfig, complete_saved
from ..errors import UserError
from ..methods.adapters import ADAPTER_CONFIG
from ..methods.registry import all_methods
from ..study.results import SCHEMA_VERSION
from ..training import checkpoint
from .files import read_json

RUN_CONFIG = "config.yaml"
RESULTS = "results.json"
METRICS = "metrics.json"  # a method's (or the baseline's) scores; written last, so it marks the folder finished
TRAIN_LOG = "train_log.jsonl"
VALIDATION_LOG = "validation_log.jsonl"  # the validation points (train.eval_every), beside the step log
REPORT = "report.md"
REPORT_HTML = "report.html"
MODEL_CARD = "README.md"  # the Hugging Face model card of a method folder or an export
LOSS_PLOT = "loss_curves.png"
ROUGE_PLOT = "rouge.png"
BASELINE = "baseline"  # the untouched model's folder in a comparison (zero-shot, in the run's prompt format)
BASELINES = "baselines"  # the other baselines' folders: baselines/<name>/ (baselines.py)
SPLITS = ("train", "eval")
WEIGHT_FILES = tuple(dict.fromkeys(m.weights_file for m in all_methods().values()))

# Settings that may differ when a comparison resumes: where it goes, which methods and baselines run, how often it
# checkpoints, which trackers it reports to.
RESUMABLE_CHANGES = ("out", "methods", "eval.baselines", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.report_to")


def predictions(split: str) -> str:
    """The predictions file of a split ("train" or "eval")."""
    return f"predictions_{split}.jsonl"


def seed_folder(method: str, seed: int) -> str:
    """A multi-seed comparison's folder for one seed of a method, relative to the comparison."""
    return f"{method}/seed-{seed}"


# `peftsum scale`: one comparison per model in <out>/<model folder>/, summed up in these files of <out>.
SCALE_JSON = "scale.json"
SCALE_REPORT = "scale.md"
SCALE_PLOT = "scale.png"


def model_folder(model: str) -> str:
    """A scale's folder for one model, relative to the scale: the model's name (a hub id's slash becomes '_'), or a
    local folder's last part."""
    path = Path(model)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", path.name if path.is_dir() else model)


# What peftsum writes into a method folder (and nothing else is deleted by --overwrite).
METHOD_FILES = (METRICS, RUN_CONFIG, MODEL_CARD, TRAIN_LOG, VALIDATION_LOG, *map(predictions, SPLITS), ADAPTER_CONFIG,
                *WEIGHT_FILES)
RUN_FILES = (RESULTS, REPORT, REPORT_HTML, LOSS_PLOT, ROUGE_PLOT)


def finished(folder: Path) -> bool:
    """Whether a method's (or the baseline's) folder holds its final scores."""
    return (Path(folder) / METRICS).is_file()


def clear_method(folder: Path) -> None:
    """Remove a previous run's results and checkpoints from a method folder (for --overwrite)."""
    if not folder.is_dir():
        return
    checkpoint.remove(folder)
    for name in METHOD_FILES:
        (folder / name).unlink(missing_ok=True)
    for seed in folder.glob("seed-*"):  # the runs of a multi-seed comparison
        clear_method(seed)


def _refuse(what: str) -> UserError:
    return UserError(f"{what}; pass --overwrite to replace it (or --resume to reuse what is finished)")


def trained_weights(folder: Path) -> Path | None:
    """The final weights of a finished `train` run in `folder`, if any (checkpoints left means not finished)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file() and checkpoint.latest(folder) is None:
            return folder / name
    return None


def prepare_train_folder(folder: Path, resume: bool, overwrite: bool) -> bool:
    """Decide what `train` does with `folder`; True when a finished run is there and --resume asks to keep it."""
    if overwrite:
        clear_method(folder)
        return False
    done = trained_weights(folder)
    if done is not None and not resume:
        raise _refuse(f"{folder} already holds a finished run ({done.name})")
    return done is not None


def prepare_compare_folder(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Clear the folder (--overwrite), or check that what it holds belongs to this comparison."""
    if overwrite and out.is_dir():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in (BASELINE, *METHODS):
            clear_method(out / name)
        for folder in (out / BASELINES).glob("*"):
            clear_method(folder)
    if overwrite or not (out / RESULTS).is_file():
        return
    previous = read_results(out / RESULTS)
    changes = _changes(previous, cfg)
    if changes:
        raise UserError(f"{out} holds a comparison with other settings ({'; '.join(changes[:3])}); pass --overwrite "
                        f"to replace it, or choose another --out")
    if _complete(previous, cfg) and not resume:
        raise _refuse(f"{out} already holds a finished comparison ({RESULTS})")


def finished_comparison(out: Path, cfg: RunConfig) -> dict | None:
    """The results.json of a finished comparison of `cfg` in `out` (same settings, every method and baseline of
    `cfg` scored), or None: what may be read back instead of loading the model at all."""
    if not (out / RESULTS).is_file():
        return None
    previous = read_results(out / RESULTS)
    return previous if not _changes(previous, cfg) and _complete(previous, cfg) else None


def read_results(path: Path) -> dict:
    """A comparison's results.json, as written (`analysis.upgrade` brings an older one to today's schema); one
    written by a newer peftsum is refused (`refuse_newer_results`)."""
    results = read_json(path)
    if not isinstance(results, dict):
        raise UserError(f"{path} must hold a JSON object (a comparison's results); delete it or pass --overwrite")
    refuse_newer_results(results, path)
    return results


def refuse_newer_results(results: dict, where: Path | str) -> None:
    """Refuse results written by a newer peftsum (a schema this one cannot know), naming the version that wrote them:
    read with today's reader, they would be re-rendered silently wrong."""
    version = results.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise UserError(f"{where} was written by peftsum schema {version} (peftsum "
                        f"{results.get('peftsum_version', 'unknown')}); this peftsum reads schema {SCHEMA_VERSION} "
                        f"and older: upgrade peftsum")


def _changes(previous: dict, cfg: RunConfig) -> list[str]:
    """The settings in which a saved comparison differs from `cfg`, beyond those a resumed one may change."""
    return [c for c in checkpoint.config_changes(complete_saved(previous.get("config", {})), cfg.to_dict())
            if c.split(":")[0] not in RESUMABLE_CHANGES]


def _complete(previous: dict, cfg: RunConfig) -> bool:
    """Whether a saved comparison scored every method and baseline that `cfg` asks for."""
    done = set(previous.get("methods", {}))
    scored = {b.get("kind") for b in (previous.get("baselines") or {}).values()}
    return set(cfg.methods) <= done and (not cfg.eval.before or set(cfg.eval.baselines) <= scored)


def run_config_path(run: Path) -> Path:
    """The settings file of a trained method folder; refuses a folder that is not one, pointing inside a comparison."""
    path = run / RUN_CONFIG
    if path.is_file():
        return path
    inside = sorted(p.name for p in run.iterdir() if (p / RUN_CONFIG).is_file()) if run.is_dir() else []
    hint = f"; the comparison's method folders are: {', '.join(str(run / m) for m in inside)}" if inside else ""
    raise UserError(f"{run} is not a trained run folder (no {RUN_CONFIG}){hint}")
