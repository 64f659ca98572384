"""The one command line: `peftsum compare | train | evaluate | score | sweep | summarize | export`.

Every config key is a flag (`--train.epochs 2`, `--lora.rank 16`), applied over `--config FILE` over the defaults;
the common ones have short aliases (`--model`, `--data`, `--methods`, `--out`, `--epochs`...). Mistakes a user can
make end in one line on stderr and exit code 2.

`compare`, `train` and `evaluate` also run as several processes: `torchrun --nproc-per-node N -m peftsum ...` or
`accelerate launch -m peftsum ...` (data-parallel; `--fsdp` shards full fine-tuning). Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from . import lock, signals
from .config import METHODS, config_from_args, flag_names
from .errors import UserError

ALIASES = {  # flag -> config key
    "--model": "model.name", "--data": "data.source", "--methods": "methods", "--out": "out",
    "--document-column": "data.document_column", "--summary-column": "data.summary_column",
    "--epochs": "train.epochs", "--batch-size": "train.batch_size", "--max-steps": "train.max_steps",
    "--seed": "train.seed", "--train-size": "data.train_size", "--eval-size": "data.eval_size",
    "--max-length": "data.max_length", "--template": "data.template", "--precision": "model.precision",
    "--device": "model.device", "--seeds": "seeds", "--budget-seconds": "train.budget_seconds",
    "--budget-tokens": "train.budget_tokens",
}


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-0.001" as a value but "-1e-3" as an unknown flag; every number is a value here, so that
        # `--lora.lr -1e-3` reaches validation and its own message.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message):  # one line and exit 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with config sections (flags override it)")
    parser.add_argument("--random-init", dest="model.random_init", action="store_const", const="true",
                        default=argparse.SUPPRESS, help="build the model from its configuration with random weights")
    parser.add_argument("--compile", dest="train.compile", action="store_const", const="true",
                        default=argparse.SUPPRESS, help="torch.compile the transformer blocks for training (faster "
                                                         "steps after a one-off compile; see BENCHMARKS.md)")
    for flag, key in ALIASES.items():
        parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE", help=f"= --{key}")
    group = parser.add_argument_group("every config key (section.field)")
    for key, _ in flag_names():
        if "." not in key:  # top-level keys (methods, out) have their plain flags above
            continue
        group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="VALUE")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in the output folder, reusing what it finished")
    group.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    parser.add_argument("--fsdp", action="store_true",
                        help="full fine-tuning sharded over the processes (torch FSDP), under torchrun or accelerate "
                             "launch; `accelerate launch --use_fsdp` selects it too")


def _launch(cfg, fsdp_flag: bool = False) -> bool:
    """Take the launcher's settings (accelerate's mixed precision unless --precision is given) and, when started as
    several processes, join their group. Returns whether FSDP is asked for."""
    from . import distributed

    try:
        if cfg.model.precision == "auto":
            cfg.model.precision = distributed.accelerate_precision() or "auto"
        distributed.init(distributed.device_choice(cfg.model.device))
    except UserError as exc:  # the same on every rank: rank 0 says it
        exc.from_main = _rank() != 0
        raise
    return distributed.fsdp_requested(fsdp_flag)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="peftsum", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    compare = commands.add_parser("compare", help="train and score every method side by side; write a report")
    _add_config_flags(compare)
    compare.add_argument("--dry-run", action="store_true", help="print the resource plan (parameter counts) only")
    compare.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    _add_run_flags(compare)

    train = commands.add_parser("train", help="train one method and save its weights")
    _add_config_flags(train)
    train.add_argument("--method", required=True, choices=METHODS)
    _add_run_flags(train)

    evaluate = commands.add_parser("evaluate", help="loss and ROUGE of the base model or a trained run on one split")
    _add_config_flags(evaluate)
    evaluate.add_argument("--run", metavar="DIR", help="a trained method folder (from train or compare)")
    evaluate.add_argument("--adapter", metavar="DIR", help="an adapter folder made by peft or peftsum (LoRA, prompt)")
    evaluate.add_argument("--split", choices=("eval", "train"), default="eval")
    evaluate.add_argument("--json", action="store_true")

    score = commands.add_parser("score", help="ROUGE of a predictions file against a references file")
    score.add_argument("--predictions", required=True, metavar="FILE", help="JSONL or one summary a line")
    score.add_argument("--references", required=True, metavar="FILE", help="JSONL or one summary a line")
    score.add_argument("--prediction-field", metavar="NAME")
    score.add_argument("--reference-field", metavar="NAME")
    score.add_argument("--samples", type=int, default=1000, help="bootstrap resamples for the 95%% interval")
    score.add_argument("--json", action="store_true")

    sweep = commands.add_parser("sweep", help="vary a method's setting; chart trainable parameters against ROUGE")
    _add_config_flags(sweep)
    sweep.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="a method's config key and its values, e.g. lora.rank=1,4,16 (repeatable); "
                            "methods without one run once at their configured settings")
    sweep.add_argument("--metric", choices=("rouge1", "rouge2", "rougeL", "rougeLsum"), default="rougeL",
                       help="the eval ROUGE score charted against trainable parameters (default rougeL)")
    group = sweep.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="read back finished points, continue the rest")
    group.add_argument("--overwrite", action="store_true", help="replace the points already in the output folder")

    from .use import add_commands

    add_commands(commands, _add_config_flags)  # summarize, export: using a trained result
    return parser


# ---------------------------------------------------------------- commands

def cmd_compare(args) -> int:
    cfg = config_from_args(args)  # before torch is imported: a bad setting is refused at once
    from .compare import compare, open_session, plan

    fsdp = _launch(cfg, args.fsdp)
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
    print(f"report: {Path(cfg.out) / 'report.md'}  (wall time {results['wall_seconds']:.0f} s)")
    return 0


def cmd_train(args) -> int:
    from .data import load_data, skipped_note

    cfg = config_from_args(args)
    cfg.methods = [args.method]
    folder = Path(cfg.out) if "out" in vars(args) else Path(cfg.out) / args.method
    splits = load_data(cfg.data, seed=cfg.train.seed)  # before torch is even imported: bad data is refused at once

    from . import checkpoint, distributed
    from .compare import check_fsdp, open_session, prepare_train_folder, train_method
    from .evaluate import mean_loss
    from .files import make_folder

    fsdp = _launch(cfg, args.fsdp)
    if fsdp:
        distributed.on_main(check_fsdp, cfg)
    with lock.holding(folder):
        if distributed.on_main(prepare_train_folder, folder, args.resume, args.overwrite):
            print(f"{folder} already holds a finished run; nothing to resume")
            return 0
        distributed.on_main(make_folder, folder)
        note = skipped_note(splits.info)
        if note:
            print(note)
        session = open_session(cfg, fsdp=fsdp)
        adapted, training = train_method(session, args.method, splits, folder)
        if distributed.is_main():
            checkpoint.remove(folder)  # the final weights are saved: nothing left to resume
        print(f"trained {args.method}: {training['steps']} steps, {training['tokens_per_s']:.0f} tokens/s; "
              f"saved to {folder}")
        if splits.eval:
            loss, _ = mean_loss(adapted, session.loaded.tokenizer, splits.eval, cfg.data, cfg.eval.batch_size,
                                session.device, session.dtype)
            print(f"eval loss {loss:.4f} on {len(splits.eval)} examples")
        return 0


def cmd_evaluate(args) -> int:
    from . import adapters
    from .compare import RUN_CONFIG, open_session
    from .data import load_data
    from .evaluate import evaluate
    from .methods import adapt, untouched
    from .metrics import format_table

    run = Path(args.run) if args.run else None
    if run is not None and args.adapter:
        raise UserError("give --run or --adapter, not both")
    if run is not None and not (run / RUN_CONFIG).is_file():
        raise UserError(f"{run} is not a trained run folder (no {RUN_CONFIG})")
    cfg = config_from_args(args, base=str(run / RUN_CONFIG) if run else None)
    _launch(cfg)
    out = Path(cfg.out) if "out" in vars(args) else None
    with lock.holding(out) if out else contextlib.nullcontext():
        if args.adapter:  # an adapter made by peft (or peftsum): base model from the adapter or --model
            from .use import adapted_from_adapter_dir

            session, adapted = adapted_from_adapter_dir(cfg, Path(args.adapter),
                                                        model_given="model.name" in vars(args))
        elif run is None:
            session = open_session(cfg)
            adapted = untouched(session.loaded.model, session.dtype)
        else:
            session = open_session(cfg)
            adapted = adapt(session.loaded.model, session.loaded.tokenizer, cfg.methods[0], cfg)
            adapters.load_into(adapted, run)
        splits = load_data(cfg.data, seed=cfg.train.seed)
        examples = splits.eval if args.split == "eval" else splits.train_eval
        result = evaluate(adapted, session.loaded.tokenizer, examples, cfg.data, cfg.eval, session.device,
                          session.dtype, predictions_path=(out / f"predictions_{args.split}.jsonl") if out else None,
                          seed=cfg.train.seed, progress=True)
        if result is None:
            raise UserError(f"the {args.split} subset is empty; raise data.eval_size or data.train_eval_size")
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{adapted.method} on {result['n']} {args.split} examples: loss {result['loss']:.4f}")
            print(format_table(result["rouge"]))
        return 0


def cmd_score(args) -> int:
    from .metrics import format_table, read_summaries, rouge_summary

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


def cmd_sweep(args) -> int:
    cfg = config_from_args(args)  # before torch is imported: a bad setting is refused at once
    from .sweep import parse_varies, run_sweep, sweep_table

    varies = parse_varies(args.vary, cfg.methods)
    _launch(cfg)
    with lock.holding(Path(cfg.out)):
        sweep = run_sweep(cfg, varies, args.metric, resume=args.resume, overwrite=args.overwrite)
    print("\n".join(sweep_table(sweep["points"], args.metric)))
    print(f"sweep: {Path(cfg.out) / 'sweep.md'}, {Path(cfg.out) / 'pareto.png'}")
    return 0


COMMANDS = {"compare": cmd_compare, "train": cmd_train, "evaluate": cmd_evaluate, "score": cmd_score,
            "sweep": cmd_sweep}


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted compare or train run."""
    from .distributed import launched

    started_as_module = Path(sys.argv[0]).resolve() == Path(__file__).with_name("__main__.py").resolve()
    program = "python -m peftsum" if started_as_module else "peftsum"
    if launched():  # the launcher's own options are not visible from here
        accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
        program = f"{'accelerate launch' if accelerate else 'torchrun'} <the same launch options> -m peftsum"
    args = [a for a in argv if a != "--overwrite"]
    return f"{program} {shlex.join(args + ([] if '--resume' in args else ['--resume']))}"


def _interrupted(args, argv: list[str], exc: KeyboardInterrupt) -> str:
    if args.command not in ("compare", "train", "sweep"):
        return f"peftsum: interrupted{signals.by(exc)}"
    saved = ""
    if getattr(exc, "saved", None) is not None:  # train.TrainingInterrupted: a checkpoint was written
        saved = f" at step {exc.step}; checkpoint saved in {exc.saved}"
    return f"peftsum: interrupted{signals.by(exc)}{saved}; resume with: {resume_command(argv)}"


# Commands that may run as several processes (each does its share; rank 0 writes); the others run as one.
PARALLEL = ("compare", "train", "evaluate")


def _rank() -> int:
    """This process's rank as its launcher set it (0 when started as one process)."""
    from .distributed import launch_rank

    return launch_rank()


def _launched() -> bool:
    from .distributed import launched

    return launched()


def _quiet_transformers() -> None:
    """Keep the terminal for our progress bars and messages. Through the environment while transformers is not
    loaded: importing it takes seconds, which a command refused for a bad flag or file should not spend."""
    if "transformers" not in sys.modules:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = _rank()
    # Rank 0 speaks for all: the other processes print nothing but their own errors.
    quiet = open(os.devnull, "w") if rank else None
    finished = False
    try:
        with signals.interrupts(), contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            if args.command not in PARALLEL and _launched():
                refusal = UserError(f"peftsum {args.command} runs as one process: start it without torchrun or "
                                    f"accelerate launch")
                refusal.from_main = rank != 0  # every rank refuses; rank 0 says it
                raise refusal
            _quiet_transformers()
            code = args.handler(args) if hasattr(args, "handler") else COMMANDS[args.command](args)
            finished = code == 0
            return code
    except UserError as exc:
        if not getattr(exc, "from_main", False):  # an error rank 0 reported for everyone is printed once, by rank 0
            print(f"peftsum: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if not rank:
            print(_interrupted(args, argv, exc), file=sys.stderr)
        return signals.exit_code(exc)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    finally:
        if quiet:
            quiet.close()
        if "torch" in sys.modules:  # joined a process group only if torch was ever imported
            from .distributed import shutdown

            shutdown(wait=finished)  # after a failure, others may never arrive: leave at once
