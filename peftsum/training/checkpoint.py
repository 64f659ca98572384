"""Training checkpoints: everything `train` needs to continue a run exactly where it stopped.

A checkpoint is a folder `<method folder>/checkpoints/step-XXXXXXXX/` with two files: `tensors.safetensors`
(trainable weights by parameter name, AdamW moments, torch RNG states, and with keep_best the best validation point's
weights) and `state.json` (scheduler, Python and NumPy RNG states, position in the epoch's batch list, loss log,
validation points, epoch stats, configuration). No pickles either way.

A checkpoint is written under a temporary name, flushed to disk and then renamed: a folder named `step-*` is
complete by construction, and a crash mid-write leaves only a `.tmp-*` folder that is ignored and later removed.

`save_training` / `restore_training` are what the training loop calls: with several processes they gather sharded
(FSDP) tensors whole and every rank's random generators into rank 0's checkpoint, and hand each rank its part back.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .. import __version__
from ..errors import UserError
from ..infra import distributed
from ..infra.files import NO_SPACE, damaged, fsync, os_error, read_json, read_tensors, write_problem

FOLDER = "checkpoints"
TENSORS = "tensors.safetensors"
STATE = "state.json"
# The layout of a checkpoint, in state.json: a newer one is refused rather than misread. Checkpoints written before
# the version was recorded have none and read as version 1, which is what they are.
SCHEMA_VERSION = 1


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def complete(run: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(run) / FOLDER
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=_step_of)


def latest(run: Path) -> Path | None:
    found = complete(run)
    return found[-1] if found else None


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save(run: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    """Write checkpoint `step` of `run` atomically, then keep only the newest `keep`.

    Whatever stops the write (a full disk, a second Ctrl-C or SIGTERM), the temporary folder is removed and the
    checkpoints already complete stay as they were.
    """
    root = Path(run) / FOLDER
    target = root / step_name(step)
    if target.is_dir():  # reached twice (an interrupt right after a resume): same step, same state
        return target
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        versioned = {"schema_version": SCHEMA_VERSION, "peftsum_version": __version__, **state}
        (tmp / STATE).write_text(json.dumps(versioned), encoding="utf-8")
        for path in (tmp / TENSORS, tmp / STATE, tmp):
            fsync(path)
        os.replace(tmp, target)
        fsync(root)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only if no checkpoint is there
        if os_error(exc) is None:
            raise
        more = " (or lower train.keep_checkpoints)" if os_error(exc).errno in NO_SPACE else ""
        raise UserError(f"cannot write checkpoint {target}: {write_problem(exc)}{more}; earlier checkpoints "
                        f"are kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run, keep)
    return target


ADVICE = "delete it to resume from an older one, or pass --overwrite to start over"


def reading(path: Path):
    """A block that reads checkpoint `path`: a damaged or incomplete one (a missing tensor or state key) is refused
    in one line naming it, with what to do."""
    return damaged(path, ADVICE)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's tensors and state; refuses one written by a newer peftsum, or holding NaN or inf."""
    state = read_json(path / STATE, ADVICE)
    if not isinstance(state, dict):
        raise UserError(f"{path / STATE} must hold a JSON object; {ADVICE}")
    version = state.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise UserError(f"{path / STATE} was written by peftsum checkpoint schema {version} (peftsum "
                        f"{state.get('peftsum_version', 'unknown')}); this peftsum reads checkpoint schema "
                        f"{SCHEMA_VERSION} and older: upgrade peftsum, or pass --overwrite to start over")
    return read_tensors(path / TENSORS, ADVICE, finite=True), state


def prune(run: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temporary folders left by crashed writers."""
    root = Path(run) / FOLDER
    for path in complete(run)[:-keep]:
        shutil.rmtree(path)
    for path in root.glob(".tmp-step-*"):
        if not path.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(path, ignore_errors=True)


def remove(run: Path) -> None:
    """Delete every checkpoint of `run` (the run finished, or is being started over)."""
    root = Path(run) / FOLDER
    if root.is_dir():
        for path in root.iterdir():
            if _step_of(path) is not None or path.name.startswith(".tmp-step-"):
                shutil.rmtree(path)
        if not any(root.iterdir()):
            root.rmdir()


# ---------------------------------------------------------------- optimizer and RNG states as tensors + JSON

def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    # JSON turned tuples (AdamW's betas) into lists; give each setting back the type the optimizer uses.
    current = optimizer.state_dict()["param_groups"]
    groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}
              for saved, now in zip(meta["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(all_cuda: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator training might draw from: dropout masks come from torch's.

    `all_cuda=False` leaves out the CUDA generators (one process of several, each on its own GPU, saves its own)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if all_cuda and torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, all_cuda: bool = True) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if all_cuda and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng/cuda/{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], i)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every setting that differs between two nested config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            changes += config_changes(a or {}, b or {}, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


# ---------------------------------------------------------------- a training run's checkpoint, over N processes

def save_training(run: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  state: dict, keep: int, device: torch.device, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Checkpoint a training run: the trainable weights by name, the optimizer, every generator and `state` (JSON),
    and `extra` tensors by name (the best validation point's weights), which `restore_training` hands back.

    A collective with several processes (every rank calls it): sharded tensors are gathered whole, each rank's
    generators are collected, and rank 0 writes; returns the checkpoint's path on every rank.
    """
    main, world = distributed.is_main(), distributed.world()
    weights = {f"weight/{name}": distributed.full_tensor(p, keep=main) for name, p in params.items()}
    weights.update({f"extra/{name}": t for name, t in (extra or {}).items()})
    optim_tensors, optim_meta = optimizer_state(optimizer)
    optim_tensors = {k: distributed.full_tensor(v, keep=main) for k, v in optim_tensors.items()}
    rng_tensors, rng_meta = rng_state(all_cuda=world == 1)
    if world > 1:
        rng_tensors.update(_rank_rng(device))
    path = Path(run) / FOLDER / step_name(step)
    if main:
        path = save(run, step, {**weights, **optim_tensors, **rng_tensors},
                    {**state, "optimizer": optim_meta, "rng": rng_meta}, keep)
    distributed.barrier()
    return path


def restore_training(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                     settings: dict, digest: str, device: torch.device, seed: int) -> tuple[dict, dict]:
    """Load checkpoint `path` into the weights, optimizer and generators (each rank its own part); returns its state
    and the `extra` tensors it was saved with (on the device, by name).

    Refuses, in one line, a checkpoint written with other training settings, on other data (`digest`), or for
    other tensors.
    """
    tensors, state = load(path)
    _check_compatible(path, state, settings, digest, params, tensors)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(distributed.shard_like(tensors[f"weight/{name}"], p))
    order = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in list(tensors.items()):  # FSDP: the moments of a sharded parameter are sharded like it
        if key.startswith("optimizer/"):
            p = order[int(key.split("/")[1])]
            if distributed.is_sharded(p) and tuple(value.shape) == tuple(p.shape):
                tensors[key] = distributed.shard_like(value, p)
    load_optimizer_state(optimizer, tensors, state["optimizer"])
    set_rng_state(tensors, state["rng"], all_cuda=distributed.world() == 1)
    if distributed.world() > 1:
        _restore_rank_rng(tensors, device, seed, state["step"])
    extra = {key.removeprefix("extra/"): value.to(device) for key, value in tensors.items() if key.startswith("extra/")}
    return state, extra


def _check_compatible(path: Path, state: dict, settings: dict, digest: str, params: dict, tensors: dict) -> None:
    start_over = "rerun with the same settings, or pass --overwrite to start over"
    changes = config_changes(state["settings"], settings)
    if changes:
        raise UserError(f"checkpoint {path} was written with other settings ({'; '.join(changes[:3])}); {start_over}")
    if state["data_digest"] != digest:
        raise UserError(f"checkpoint {path} was trained on other examples (did the data change?); {start_over}")
    for name, p in params.items():
        saved = tensors.get(f"weight/{name}")
        if saved is None or tuple(saved.shape) != tuple(p.shape):
            raise UserError(f"checkpoint {path} does not fit this model ({name}); {start_over}")


def _rank_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch (and CUDA) generator state, for rank 0's checkpoint (a collective: all ranks call it)."""
    own = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    return {f"rng/rank{r}/{key}": value for r, states in enumerate(distributed.gather_objects([own]))
            for key, value in states.items()}


def _restore_rank_rng(tensors: dict[str, torch.Tensor], device: torch.device, seed: int, step: int) -> None:
    """This rank's generators as checkpointed; reseeded where the checkpoint came from fewer processes."""
    rank = distributed.rank()
    own, cuda = tensors.get(f"rng/rank{rank}/torch"), tensors.get(f"rng/rank{rank}/cuda")
    if own is None and rank > 0:
        torch.manual_seed((seed + rank) * 1_000_003 + step)
    elif own is not None:
        torch.set_rng_state(own)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
