"""A session: the loaded base model and tokenizer, where computation happens, and the results it is adapted into.

Everything that trains, scores or uses a model starts here: `open_session` for the base model of a config,
`load_run` for a trained method folder (its config.yaml rebuilds exactly what was trained, then its weights load),
`load_adapter` for an adapter folder made by peft or peftsum. `distributed.init` (joining a data-parallel group)
is the command line's job, done once before any of these.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..config import RunConfig, validate
from ..errors import UserError
from ..infra import distributed
from ..infra.runs import RUN_CONFIG
from ..methods import adapters
from ..methods.base import Adapted, adapt
from ..methods.registry import by_peft_type, method_named
from .models import LoadedModel, compute_dtype, count_parameters, load_model, pick_device, ties_embeddings


@dataclass
class Session:
    """What every step of a run shares: the loaded base model, the config, and where computation happens."""

    cfg: RunConfig
    loaded: LoadedModel
    device: torch.device
    dtype: torch.dtype
    progress: bool = True
    fsdp: bool = False  # full fine-tuning sharded over the processes; the base model then stays on the CPU

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def open_session(cfg: RunConfig, progress: bool = True, fsdp: bool = False) -> Session:
    """Load the config's base model (rank 0 first, which fills the caches) onto this process's device."""
    device = distributed.device() or pick_device(distributed.device_choice(cfg.model.device))
    with distributed.main_first():  # rank 0 fills the caches (converted model, downloads) before the others read
        loaded = load_model(cfg.model, seed=cfg.train.seed)
    check_context(cfg, loaded.model)
    if not fsdp:
        loaded.model.to(device)
    return Session(cfg, loaded, device, compute_dtype(cfg.model.precision, device),
                   progress and distributed.is_main(), fsdp)


def check_fsdp(cfg: RunConfig) -> None:
    """FSDP is for full fine-tuning, across several processes; refuse anything else in one line."""
    if len(cfg.methods) != 1 or not method_named(cfg.methods[0]).shards_with_fsdp(getattr(cfg, cfg.methods[0])):
        raise UserError("FSDP shards full fine-tuning only: run the finetune method alone with --finetune.all true "
                        "(LoRA, prompt tuning and partial fine-tuning train few weights: run them without FSDP)")
    if cfg.train.eval_every:  # a sharded model's forwards must run in lockstep on every rank, which scoring does not
        raise UserError("not yet: validation during training (train.eval_every) does not run under FSDP; "
                        "leave train.eval_every at 0 with --fsdp")
    if not distributed.launched():
        raise UserError("FSDP shards the model over several processes: start peftsum with torchrun or "
                        "accelerate launch (see README)")


def context_length(model) -> int | None:
    """The most positions the model takes (None where its configuration does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def check_context(cfg: RunConfig, model) -> None:
    """Refuse lengths beyond the model's positions, which would crash (GPT-2) or silently degrade (RoPE) later."""
    context = context_length(model)
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


# ---------------------------------------------------------------- facts for the report

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def environment(session: Session) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(session.device) if session.device.type == "cuda" else None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peftsum": __version__, "platform": platform.platform(), "cpu": cpu_name(), "cores": _cores(),
            "device": str(session.device), "precision": str(session.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "gpu": gpu,
            **({"processes": distributed.world(), "fsdp": session.fsdp} if distributed.world() > 1 else {})}


def model_facts(session: Session) -> dict:
    model = session.loaded.model
    total, _ = count_parameters(model)
    return {"name": session.loaded.name, "source": session.loaded.source, "architecture": type(model).__name__,
            "total_params": total, "tied_embeddings": ties_embeddings(model), "random_init": session.cfg.model.random_init}


# ---------------------------------------------------------------- adapted models

def fresh_adapted(session: Session, method: str) -> Adapted:
    """A copy of the base model prepared for `method`, seeded so that initial adapter weights are reproducible."""
    torch.manual_seed(session.cfg.train.seed)
    return adapt(copy.deepcopy(session.loaded.model), session.tokenizer, method, session.cfg)


def base_copy(session: Session):
    """A copy of the untouched base model on the session's device."""
    return copy.deepcopy(session.loaded.model).to(session.device)


def load_run(cfg: RunConfig, run: Path, progress: bool = True) -> tuple[Session, Adapted]:
    """(session, adapted) for a trained method folder, with `cfg` already built from its config.yaml (+ flags)."""
    method = method_named(cfg.methods[0])
    adapters.weights_path(run, method)  # refuse a missing or pickled-only weights file before loading the model
    session = open_session(cfg, progress)
    adapted = adapt(session.loaded.model, session.tokenizer, method.name, method.saved_as(cfg))
    adapters.load_into(adapted, run)
    adapted.model.eval()  # new adapter modules start in training mode (dropout on)
    return session, adapted


def configure_from_adapter(cfg: RunConfig, config: dict, folder: Path, model_given: bool = False) -> str:
    """Set cfg (model, method and its settings) from a peft adapter_config.json; returns the method's name."""
    where = folder / adapters.ADAPTER_CONFIG
    if not isinstance(config, dict):
        raise UserError(f"{where} must hold a JSON object")
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type not in by_peft_type():
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; supported: "
                        f"{', '.join(by_peft_type())}")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UserError(f"{where}: task_type {task!r} is not supported; peftsum adapts causal LMs (CAUSAL_LM)")
    if not model_given:
        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{where} names no base model (base_model_name_or_path); pass --model")
        cfg.model.name = str(base)
    method = by_peft_type()[peft_type]
    cfg.methods = [method.name]
    method.configure(cfg, config, where)
    validate(cfg)
    return method.name


def load_adapter(cfg: RunConfig, folder: Path, model_given: bool = False,
                 progress: bool = True) -> tuple[Session, Adapted]:
    """(session, adapted) for an adapter folder made by peft or peftsum (LoRA, prompt tuning).

    cfg carries everything else (data settings, template, generation, device); its model becomes the adapter's
    base_model_name_or_path unless `model_given` (the user passed --model). cfg is updated in place.
    """
    folder = Path(folder)
    if not (folder / adapters.ADAPTER_CONFIG).is_file():
        if (folder / RUN_CONFIG).is_file():
            raise UserError(f"{folder} has no {adapters.ADAPTER_CONFIG} but is a peftsum run folder: use --run {folder}")
        if not folder.is_dir():
            raise UserError(f"adapter folder not found: {folder}")
        raise UserError(f"{folder} is not an adapter folder (no {adapters.ADAPTER_CONFIG})")
    name = configure_from_adapter(cfg, adapters.read_adapter_config(folder), folder, model_given)
    adapters.weights_path(folder, method_named(name))  # before the (possibly long) model load
    try:
        session = open_session(cfg, progress)
    except UserError as exc:
        if (folder / RUN_CONFIG).is_file():  # e.g. a random-init run: its base model is a config-only folder
            raise UserError(f"{exc} (this adapter is a peftsum run: --run {folder} rebuilds its base model)") from None
        raise
    adapted = adapt(session.loaded.model, session.tokenizer, name, cfg)
    adapters.load_into(adapted, folder)
    unused = adapters.unused_keys(adapted, folder)
    if unused:
        raise UserError(f"{adapters.weights_path(folder, adapted.method)}: {len(unused)} tensors belong to layers "
                        f"peftsum does not adapt (LoRA on linear/Conv1D layers only), e.g. {unused[0]}")
    adapted.model.eval()  # new adapter modules start in training mode (dropout on)
    return session, adapted
