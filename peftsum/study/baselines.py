"""What every method must beat to be worth training, scored on the same documents as the methods, with the same ROUGE,
intervals and per-document scores (so analysis.py can test every method against each):

- **zero-shot**: the untouched model prompted in the run's format (`results["baseline"]`, the report's "before"), and,
  when `data.format: auto` chose the chat format, in the plain format too, so the report shows which prompt suits
  the untouched model;
- **lead**: the document's first k sentences (pysbd, offline, as for ROUGE-Lsum; a line break always ends one), or
  its first k lines for dialogues (one turn a line); k and the unit come from the data set's kind (data.KINDS: 3
  sentences for news, 1 for one-sentence sets) unless `eval.lead_k` / `eval.lead_unit` say otherwise;
- **few-shot**: the untouched model shown up to `eval.shots` training examples (a seeded draw, each cut as training
  cuts it) before the document, as many as fit the model's context with room for the summary; skipped, with a
  note, when not even one does. The alternative to training that a practitioner weighs first.

Each baseline has its folder (the run-format zero-shot in `baseline/`, as before; the others in `baselines/<name>/`)
holding its predictions and `metrics.json`, written last, so a resumed comparison reads finished baselines back.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..core.data import Example, Splits, data_kind
from ..core.prompts import prompt_format, resolve_format
from ..core.session import Session, context_length
from ..evaluation.evaluate import evaluate, generate_from, score_predictions
from ..evaluation.metrics import split_sentences
from ..infra import distributed, runs
from ..infra.files import read_json, write_json
from ..methods.base import Adapted
from .results import ZERO_SHOT


@dataclass
class Baseline:
    """One baseline a comparison scores: its name (results["baselines"] key), kind, label and folder."""

    name: str
    kind: str  # zero-shot | lead | few-shot
    label: str
    folder: str  # relative to the comparison
    settings: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {"kind": self.kind, "label": self.label, "dir": self.folder, "settings": self.settings}


def zero_shot_label(fmt: str) -> str:
    return f"untouched model ({fmt})"


def lead_settings(cfg: RunConfig) -> tuple[int, str]:
    """(k, unit) of the lead baseline: eval.lead_k / eval.lead_unit, else the data set kind's."""
    kind = data_kind(cfg.data.source)
    return cfg.eval.lead_k or kind.lead_k, kind.lead_unit if cfg.eval.lead_unit == "auto" else cfg.eval.lead_unit


def plan(cfg: RunConfig, tokenizer) -> list[Baseline]:
    """The baselines `cfg` asks for (none when eval.before is off), in the order they are scored."""
    if not cfg.eval.before:
        return []
    run_format = resolve_format(tokenizer, cfg.data)
    planned = []
    for kind in cfg.eval.baselines:
        if kind == "zero-shot":
            planned.append(Baseline(ZERO_SHOT, kind, zero_shot_label(run_format), runs.BASELINE,
                                    {"format": run_format}))
            if cfg.data.format == "auto" and run_format == "chat":
                name = "zero-shot-plain"
                planned.append(Baseline(name, kind, zero_shot_label("plain"), f"{runs.BASELINES}/{name}",
                                        {"format": "plain"}))
        elif kind == "lead":
            k, unit = lead_settings(cfg)
            label = f"lead-{k}" + (" lines" if unit == "line" else "")
            planned.append(Baseline("lead", kind, label, f"{runs.BASELINES}/lead", {"k": k, "unit": unit}))
        else:
            planned.append(Baseline("few-shot", kind, f"few-shot ({run_format})", f"{runs.BASELINES}/few-shot",
                                    {"format": run_format, "most_shots": cfg.eval.shots}))
    return planned


# ---------------------------------------------------------------- lead-k (pure)


def lead(document: str, k: int, unit: str = "sentence", max_words: int | None = None) -> str:
    """The first k sentences (unit "sentence": pysbd within each line, so a line break always ends one) or lines
    (unit "line") of `document`. A unit longer than `max_words` words (text without sentence punctuation) is cut
    there, as a generated summary would be by its token cap."""
    lines = [line.strip() for line in document.splitlines() if line.strip()]
    units = lines if unit == "line" else [s for line in lines for s in split_sentences(line)]
    if max_words is not None:
        units = [" ".join(u.split()[:max_words]) for u in units]
    return " ".join(units[:k])


# ---------------------------------------------------------------- few-shot


def shot_pool(splits: Splits) -> tuple[list[Example], bool]:
    """(training examples to draw worked examples from, whether the "train" rows can be scored): the training
    examples outside the scored train-eval subset, so no document is shown its own summary; all of them (and no
    train rows) where the subset is the whole training set."""
    scored = {e.id for e in splits.train_eval}
    pool = [e for e in splits.train if e.id not in scored]
    return (pool, True) if pool else (splits.train, False)


def few_shot_prompts(fmt, shots: list[Example], documents: list[str], cfg: RunConfig,
                     context: int | None) -> tuple[int, list[list[int]]]:
    """(k, prompts): the most worked examples (up to len(shots), in order) with which every document's prompt and
    eval.max_new_tokens fit `context` (None: no limit), and those prompts; (0, []) when not even one fits."""
    budget = fmt.budget(cfg.data)
    for k in range(len(shots), 0, -1):
        prompts = [fmt.few_shot(shots[:k], d, cfg.data, budget) for d in documents]
        if context is None or max(map(len, prompts)) + cfg.eval.max_new_tokens <= context:
            return k, prompts
    return 0, []


# ---------------------------------------------------------------- scoring


def _split_pairs(splits: Splits, train: bool = True) -> list[tuple[str, list[Example]]]:
    return [("train", splits.train_eval if train else []), ("eval", splits.eval)]


def _lead(session: Session, baseline: Baseline, splits: Splits, folder: Path) -> dict:
    cfg, (k, unit) = session.cfg, (baseline.settings["k"], baseline.settings["unit"])
    scores = {}
    for split, examples in _split_pairs(splits):
        predictions = [lead(e.document, k, unit, max_words=cfg.eval.max_new_tokens) for e in examples]
        scores[split] = score_predictions(examples, predictions, cfg.eval.bootstrap_samples, cfg.train.seed,
                                          folder / runs.predictions(split)) if examples else None
    return scores


def _zero_shot(session: Session, baseline: Baseline, splits: Splits, folder: Path, model: Adapted) -> dict:
    cfg = session.cfg
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.format = baseline.settings["format"]
    return {split: evaluate(model, session.tokenizer, examples, data_cfg, cfg.eval, session.device, session.dtype,
                            predictions_path=folder / runs.predictions(split), seed=cfg.train.seed,
                            progress=session.progress, desc=f"{baseline.label} {split}")
            for split, examples in _split_pairs(splits)}


def _few_shot(session: Session, baseline: Baseline, splits: Splits, folder: Path, model: Adapted) -> dict:
    cfg = session.cfg
    pool, train_scored = shot_pool(splits)
    shots = random.Random(cfg.train.seed).sample(pool, min(cfg.eval.shots, len(pool)))
    fmt = prompt_format(session.tokenizer, cfg.data)
    scored = _split_pairs(splits, train=train_scored)
    documents = [e.document for _, examples in scored for e in examples]
    context = context_length(session.loaded.model)
    k, prompts = few_shot_prompts(fmt, shots, documents, cfg, context)
    if k == 0:
        single = fmt.few_shot(shots[:1], max(documents, key=len), cfg.data, fmt.budget(cfg.data))
        return {"train": None, "eval": None,
                "note": f"skipped: one training example with the longest document makes a {len(single)}-token "
                        f"prompt, which with eval.max_new_tokens ({cfg.eval.max_new_tokens}) exceeds the model's "
                        f"context ({context} tokens)"}
    # As many prompt tokens per batch as a zero-shot batch holds: few-shot prompts are several times longer.
    batch_size = max(1, cfg.eval.batch_size * fmt.budget(cfg.data) // max(map(len, prompts)))
    predictions = generate_from(model, session.tokenizer, prompts, cfg.eval, fmt.stop_ids, session.device,
                                session.dtype, progress=session.progress, desc=baseline.label,
                                batch_size=batch_size)
    scores, start = {}, 0
    for split, examples in scored:
        mine, start = predictions[start:start + len(examples)], start + len(examples)
        scores[split] = score_predictions(examples, mine, cfg.eval.bootstrap_samples, cfg.train.seed,
                                          folder / runs.predictions(split)) if examples else None
    note = None if train_scored else "train rows not scored: every training example is a scored one"
    return {**scores, "shots": k, "shot_ids": [s.id for s in shots[:k]], "note": note}


def score(session: Session, baseline: Baseline, splits: Splits, out: Path,
          untouched: Callable[[], Adapted]) -> dict | None:
    """The baseline's results ({kind, label, dir, settings, train, eval, ...}) scored into its folder, or read back
    from there when it finished earlier (None on ranks other than 0 then: only rank 0 keeps results).
    `untouched` gives the untouched model, made once for all baselines that need it."""
    folder = out / baseline.folder
    if distributed.broadcast_object(runs.finished(folder)):  # rank 0 decides: all ranks take one branch
        print(f"{baseline.label}: scores read back from {folder / runs.METRICS}")
        return {**baseline.meta(), **read_json(folder / runs.METRICS)} if distributed.is_main() else None
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    if baseline.kind == "lead":
        scores = _lead(session, baseline, splits, folder)
    elif baseline.kind == "zero-shot":
        scores = _zero_shot(session, baseline, splits, folder, untouched())
    else:
        scores = _few_shot(session, baseline, splits, folder, untouched())
    result = {**baseline.meta(), "note": None, **scores}
    if distributed.is_main():
        write_json(folder / runs.METRICS, result)
    return result
