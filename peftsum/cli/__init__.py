"""Command line: `peftsum compare | train | sweep | scale | evaluate | score | summarize | export | report | push`.

One table, `COMMANDS`, maps each command to its flags and the function that runs it (compare, train and sweep in
run.py; scale.py; evaluate and score in evaluate.py; summarize.py; export.py; report and push in share.py). Mistakes a
user can make end in one line on stderr and exit code 2.

`compare`, `train` and `evaluate` also run as several processes: `torchrun --nproc-per-node N -m peftsum ...` or
`accelerate launch -m peftsum ...` (data-parallel; `--fsdp` shards full fine-tuning). Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..infra import signals
from . import evaluate, export, run, scale, share, summarize
from .flags import Parser


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    parallel: bool = False  # may run as several processes (each does its share; rank 0 writes)
    resumable: bool = False  # an interrupted run prints the command that continues it


COMMANDS: dict[str, Command] = {
    "compare": Command("train and score every method side by side; write a report", run.add_compare, run.compare,
                       parallel=True, resumable=True),
    "train": Command("train one method and save its weights", run.add_train, run.train, parallel=True,
                     resumable=True),
    "evaluate": Command("loss and ROUGE of the base model or a trained run on one split", evaluate.add_evaluate,
                        evaluate.evaluate, parallel=True),
    "score": Command("ROUGE of a predictions file against a references file", evaluate.add_score, evaluate.score),
    "sweep": Command("vary a method's setting; chart trainable parameters against ROUGE", run.add_sweep, run.sweep,
                     resumable=True),
    "scale": Command("the same comparison over several models; chart scores against size", scale.add_scale,
                     scale.scale, description=scale.DESCRIPTION, resumable=True),
    "summarize": Command("summarize documents with a trained run, a peft adapter, or the base model",
                         summarize.add_summarize, summarize.summarize, description=summarize.DESCRIPTION),
    "export": Command("write a standalone merged model from a trained LoRA or fine-tuning run", export.add_export,
                      export.export, description=export.DESCRIPTION),
    "report": Command("re-render a comparison's report.md, report.html, plots and model cards", share.add_report,
                      share.report),
    "push": Command("upload a trained method folder or an export to the Hugging Face hub", share.add_push, share.push),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="peftsum", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help, description=command.description))
    return parser


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted compare or train run."""
    from ..infra.distributed import launched

    started_as_module = Path(sys.argv[0]).resolve() == Path(__file__).parent.with_name("__main__.py").resolve()
    program = "python -m peftsum" if started_as_module else "peftsum"
    if launched():  # the launcher's own options are not visible from here
        accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
        program = f"{'accelerate launch' if accelerate else 'torchrun'} <the same launch options> -m peftsum"
    args = [a for a in argv if a != "--overwrite"]
    return f"{program} {shlex.join(args + ([] if '--resume' in args else ['--resume']))}"


def _interrupted(args, argv: list[str], exc: KeyboardInterrupt) -> str:
    if not COMMANDS[args.command].resumable:
        return f"peftsum: interrupted{signals.by(exc)}"
    saved = ""
    if getattr(exc, "saved", None) is not None:  # train.TrainingInterrupted: a checkpoint was written
        saved = f" at step {exc.step}; checkpoint saved in {exc.saved}"
    return f"peftsum: interrupted{signals.by(exc)}{saved}; resume with: {resume_command(argv)}"


def _rank() -> int:
    """This process's rank as its launcher set it (0 when started as one process)."""
    from ..infra.distributed import launch_rank

    return launch_rank()


def _launched() -> bool:
    from ..infra.distributed import launched

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
            if not COMMANDS[args.command].parallel and _launched():
                refusal = UserError(f"peftsum {args.command} runs as one process: start it without torchrun or "
                                    f"accelerate launch")
                refusal.from_main = rank != 0  # every rank refuses; rank 0 says it
                raise refusal
            _quiet_transformers()
            code = COMMANDS[args.command].run(args)
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
            from ..infra.distributed import shutdown

            shutdown(wait=finished)  # after a failure, others may never arrive: leave at once
