"""Flags shared by the commands: every config key, the common aliases, run-folder and source flags.

Every config key is a flag (`--train.epochs 2`, `--lora.rank 16`), applied over `--config FILE` over the defaults;
the common ones have short aliases (`--model`, `--data`, `--methods`, `--out`, `--epochs`...).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..config import flag_names
from ..errors import UserError

ALIASES = {  # flag -> config key
    "--model": "model.name", "--data": "data.source", "--methods": "methods", "--out": "out",
    "--document-column": "data.document_column", "--summary-column": "data.summary_column",
    "--epochs": "train.epochs", "--batch-size": "train.batch_size", "--max-steps": "train.max_steps",
    "--seed": "train.seed", "--train-size": "data.train_size", "--eval-size": "data.eval_size",
    "--max-length": "data.max_length", "--template": "data.template", "--precision": "model.precision",
    "--device": "model.device", "--seeds": "seeds", "--budget-seconds": "train.budget_seconds",
    "--budget-tokens": "train.budget_tokens", "--format": "data.format", "--instruction": "data.instruction",
    "--baselines": "eval.baselines", "--report-to": "train.report_to",
}


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-0.001" as a value but "-1e-3" as an unknown flag; every number is a value here, so that
        # `--lora.lr -1e-3` reaches validation and its own message.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message):  # one line and exit 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with config sections (flags override it)")
    parser.add_argument("--random-init", dest="model.random_init", action="store_const", const="true",
                        default=argparse.SUPPRESS, help="build the model from its configuration with random weights")
    parser.add_argument("--compile", dest="train.compile", action="store_const", const="true",
                        default=argparse.SUPPRESS, help="torch.compile the transformer blocks for training (faster "
                                                         "steps after a one-off compile; default auto: where it "
                                                         "pays, see BENCHMARKS.md)")
    parser.add_argument("--no-compile", dest="train.compile", action="store_const", const="false",
                        default=argparse.SUPPRESS, help="train with the plain blocks (= --train.compile false)")
    for flag, key in ALIASES.items():
        parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE", help=f"= --{key}")
    group = parser.add_argument_group("every config key (section.field)")
    for key, _ in flag_names():
        if "." not in key:  # top-level keys (methods, out) have their plain flags above
            continue
        group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="VALUE")


def add_run_flags(parser: argparse.ArgumentParser, fsdp: bool = True) -> None:
    """--resume / --overwrite for a command that writes a run folder (and --fsdp where it trains)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in the output folder, reusing what it finished")
    group.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    if fsdp:
        parser.add_argument("--fsdp", action="store_true",
                            help="full fine-tuning sharded over the processes (torch FSDP), under torchrun or "
                                 "accelerate launch; `accelerate launch --use_fsdp` selects it too")


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """--run / --adapter: what a command uses (neither: the untouched base model); see source.open_source."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", metavar="DIR", help="a trained method folder (from train or compare)")
    source.add_argument("--adapter", metavar="DIR",
                        help="an adapter folder (adapter_config.json + adapter_model.safetensors) made by peft or "
                             "peftsum; base model: --model, else the adapter's base_model_name_or_path")


def check_out(folder: Path) -> None:
    """Refuse an --out folder that cannot be created or written, before torch is imported: the imports take seconds a
    refusal should not cost (lock.holding checks it again, when the folder is taken). Launched as several processes,
    rank 0 alone probes the folder, as it alone writes there; its launcher then stops the others."""
    from ..infra import distributed
    from ..infra.files import check_writable

    if distributed.launch_rank() == 0:
        check_writable(folder, "--out")


def launch(cfg, fsdp_flag: bool = False) -> bool:
    """Take the launcher's settings (accelerate's mixed precision unless --precision is given) and, when started as
    several processes, join their group: the one place that does. Returns whether FSDP is asked for."""
    from ..infra import distributed

    try:
        if cfg.model.precision == "auto":
            cfg.model.precision = distributed.accelerate_precision() or "auto"
        distributed.init(distributed.device_choice(cfg.model.device))
    except UserError as exc:  # the same on every rank: rank 0 says it
        exc.from_main = distributed.launch_rank() != 0
        raise
    return distributed.fsdp_requested(fsdp_flag)
