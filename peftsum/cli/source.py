"""What `evaluate`, `summarize` and `export` use: a trained run (--run), an adapter folder (--adapter), or neither
(the untouched base model). One function builds the config and loads it, for all three."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, config_from_args
from .flags import launch


def open_source(args, progress: bool = True):
    """(cfg, session, adapted) for --run, --adapter, or neither (the untouched base model).

    A run is rebuilt from its own config.yaml (then flags on top); an adapter takes the base model it names unless
    --model is given (and, when a peftsum run wrote it, that run's prompt format); the base model takes the config as
    given. Joins a data-parallel group when launched as several
    processes.
    """
    from ..core import session
    from ..infra import runs

    run = Path(args.run) if getattr(args, "run", None) else None
    cfg = config_from_args(args, base=runs.run_config_path(run) if run is not None else None)
    launch(cfg)
    if run is not None:
        loaded, adapted = session.load_run(cfg, run, progress)
    elif getattr(args, "adapter", None):
        _prompt_of_run(cfg, Path(args.adapter), args)
        loaded, adapted = session.load_adapter(cfg, Path(args.adapter), model_given="model.name" in vars(args),
                                               progress=progress)
    else:
        from ..methods.base import untouched

        loaded = session.open_session(cfg, progress)
        adapted = untouched(loaded.loaded.model, loaded.dtype)
    return cfg, loaded, adapted


PROMPT_KEYS = ("format", "instruction", "system", "template")


def _prompt_of_run(cfg: RunConfig, folder: Path, args) -> None:
    """An adapter folder that a peftsum run wrote is prompted as it was trained (its config.yaml's prompt format),
    unless flags say otherwise; a peft-made adapter takes the configured format."""
    from ..config import load_config
    from ..infra import runs

    if (folder / runs.RUN_CONFIG).is_file():
        trained = load_config(folder / runs.RUN_CONFIG, saved=True).data
        for key in PROMPT_KEYS:
            if f"data.{key}" not in vars(args):
                setattr(cfg.data, key, getattr(trained, key))


def source_config(args) -> RunConfig:
    """The config `open_source` will use, without loading anything (for checks before the model loads)."""
    from ..infra import runs

    run = Path(args.run) if getattr(args, "run", None) else None
    return config_from_args(args, base=runs.run_config_path(run) if run is not None else None)
