"""The commands that train and write a run folder: `compare`, `train`, `sweep`."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import METHODS, config_from_args
from .flags import add_config_flags, add_run_flags, check_out, launch


def add_compare(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resource plan (parameter counts) only")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    add_run_flags(parser)


def compare(args) -> int:
    cfg = config_from_args(args)  # before torch is imported: a bad setting is refused at once
    if not args.dry_run:
        check_out(Path(cfg.out))
    from ..core.session import open_session
    from ..infra import lock, runs
    from ..study.compare import compare, plan

    fsdp = launch(cfg, args.fsdp)
    if args.dry_run:
        result = plan(open_session(cfg, progress=False))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            m = result["model"]
            print(f"model {m['name']} ({m['architecture']}, {m['total_params']:,} parameters)")
            for method, counts in result["methods"].items():
                print(f"  {method:<9} trainable {counts['trainable']:>12,} of {counts['total']:>12,} "
                      f"({counts['trainable_percent']:.4f}%)  {counts['description']}")
        return 0
    with lock.holding(Path(cfg.out)):
        results = compare(cfg, resume=args.resume, overwrite=args.overwrite, fsdp=fsdp)
    from ..outputs.report import answer_sentences

    out = Path(cfg.out)
    if "analysis" in results:  # rank 0 alone analyses; the other processes of a data-parallel run print nothing
        print("\n".join(answer_sentences(results)))
    print(f"report: {out / runs.REPORT}, {out / runs.REPORT_HTML}  (wall time {results['wall_seconds']:.0f} s)")
    return 0


def add_train(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--method", required=True, choices=METHODS)
    add_run_flags(parser)


def train(args) -> int:
    from ..core.data import load_data

    cfg = config_from_args(args)
    cfg.methods = [args.method]
    folder = Path(cfg.out) if "out" in vars(args) else Path(cfg.out) / args.method
    check_out(folder)
    # Before the model loads: bad data is refused at once.
    splits = load_data(cfg.data, seed=cfg.train.seed, validation_size=cfg.train.validation_size)

    from ..infra import lock
    from ..training.recipe import train_folder

    fsdp = launch(cfg, args.fsdp)
    with lock.holding(folder):
        trained = train_folder(cfg, args.method, splits, folder, resume=args.resume, overwrite=args.overwrite,
                               fsdp=fsdp)
    if trained is None:
        print(f"{folder} already holds a finished run; nothing to resume")
        return 0
    training, after = trained.result["training"], trained.result["after"]
    print(f"trained {args.method}: {training['steps']} steps, {training['tokens_per_s']:.0f} tokens/s; "
          f"saved to {folder}{_validation_outcome(training)}")
    if "eval" in after:
        print(f"eval loss {after['eval']['loss']:.4f} on {after['eval']['n']} examples")
    return 0


def _validation_outcome(training: dict) -> str:
    """"; stopped early at step 40; weights of step 30 (best validation loss)", or "" without validation."""
    if "validation" not in training:
        return ""
    stopped = f"; stopped early at step {training['steps']}" if training["stopped_early"] else ""
    kept = (f"; weights of step {training['weights_step']} (best validation loss)"
            if training["weights_step"] != training["steps"] else "")
    return stopped + kept


def add_sweep(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a method's config key and its values, e.g. lora.rank=1,4,16 (repeatable); "
                             "methods without one run once at their configured settings")
    parser.add_argument("--metric", choices=("rouge1", "rouge2", "rougeL", "rougeLsum"), default="rougeL",
                        help="the eval ROUGE score charted against trainable parameters (default rougeL)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="read back finished points, continue the rest")
    group.add_argument("--overwrite", action="store_true", help="replace the points already in the output folder")


def sweep(args) -> int:
    cfg = config_from_args(args)  # before torch is imported: a bad setting is refused at once
    check_out(Path(cfg.out))
    from ..infra import lock
    from ..study.sweep import parse_varies, run_sweep, sweep_table

    varies = parse_varies(args.vary, cfg.methods)
    launch(cfg)
    with lock.holding(Path(cfg.out)):
        result = run_sweep(cfg, varies, args.metric, resume=args.resume, overwrite=args.overwrite)
    print("\n".join(sweep_table(result["points"], args.metric)))
    print(f"sweep: {Path(cfg.out) / 'sweep.md'}, {Path(cfg.out) / 'pareto.png'}")
    return 0
