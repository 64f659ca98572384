"""Scoring: `evaluate` (loss and ROUGE of a run, an adapter or the base model on a split) and `score` (ROUGE of a
predictions file against references)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..errors import UserError
from .flags import add_config_flags, add_source_flags


def add_evaluate(parser) -> None:
    add_config_flags(parser)
    add_source_flags(parser)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--json", action="store_true")


def evaluate(args) -> int:
    from ..core.data import load_data
    from ..evaluation.evaluate import evaluate
    from ..evaluation.metrics import format_table
    from ..infra import lock, runs
    from .source import open_source, source_config

    out = Path(source_config(args).out) if "out" in vars(args) else None
    with lock.holding(out) if out else contextlib.nullcontext():
        cfg, session, adapted = open_source(args)
        splits = load_data(cfg.data, seed=cfg.train.seed)
        examples = splits.eval if args.split == "eval" else splits.train_eval
        result = evaluate(adapted, session.tokenizer, examples, cfg.data, cfg.eval, session.device, session.dtype,
                          predictions_path=(out / runs.predictions(args.split)) if out else None,
                          seed=cfg.train.seed, progress=True)
    if result is None:
        raise UserError(f"the {args.split} subset is empty; raise data.eval_size or data.train_eval_size")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{adapted.name} on {result['n']} {args.split} examples: loss {result['loss']:.4f}")
        print(format_table(result["rouge"]))
    return 0


def add_score(parser) -> None:
    parser.add_argument("--predictions", required=True, metavar="FILE", help="JSONL or one summary a line")
    parser.add_argument("--references", required=True, metavar="FILE", help="JSONL or one summary a line")
    parser.add_argument("--prediction-field", metavar="NAME")
    parser.add_argument("--reference-field", metavar="NAME")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples for the 95%% interval")
    parser.add_argument("--json", action="store_true")


def score(args) -> int:
    from ..evaluation.metrics import format_table, read_summaries, rouge_summary

    if args.samples < 0:
        raise UserError(f"--samples must be >= 0 (0 = no interval), got {args.samples}")
    predictions = read_summaries(args.predictions, args.prediction_field)
    references = read_summaries(args.references, args.reference_field)
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise UserError(f"{args.predictions} holds no summaries")
    if any(not isinstance(p, str) for p in predictions):
        raise UserError(f"{args.predictions}: each prediction must be one string, not a list")
    summary = rouge_summary(predictions, references, samples=args.samples)
    if args.json:
        print(json.dumps({"n": len(predictions), "rouge": summary}, indent=2))
    else:
        print(f"{len(predictions)} documents; F1 x 100, 95% bootstrap interval")
        print(format_table(summary))
    return 0
