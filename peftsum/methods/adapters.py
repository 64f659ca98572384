"""Adapter files: a method's trained tensors on disk, in the Hugging Face `peft` layout where the method has one.

Methods with a peft form (LoRA, soft prompts) are written as `adapter_config.json` + `adapter_model.safetensors`
under peft's key names, so `PeftModel.from_pretrained(base, folder)` loads them; fine-tuning writes only the trained
tensors, under the model's own parameter names, to `finetuned.safetensors`. Which tensors and which names is each
method's business (methods/); this module only reads and writes. Only safetensors are read: never pickles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..infra.files import atomic_write, damaged, read_json, read_tensors, require_file, write_json
from .base import Adapted, Method

ADAPTER_CONFIG = "adapter_config.json"
# Weight files in pickle-based formats (torch.save and friends): unpickling can run arbitrary code, so never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def save(adapted: Adapted, folder: Path, base_model: str, cfg) -> list[Path]:
    """Write the trained weights of `adapted` (and peft's adapter config, where it has one) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    method = adapted.method
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in method.saved_tensors(adapted).items()}
    weights = folder / method.weights_file
    atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = method.adapter_config(adapted, cfg, base_model)
    if config is None:
        return [weights]
    write_json(folder / ADAPTER_CONFIG, config)
    return [weights, folder / ADAPTER_CONFIG]


def load_into(adapted: Adapted, folder: Path) -> None:
    """Load trained weights saved by `save` (or by peft) into a freshly adapted model of the same configuration."""
    path = weights_path(folder, adapted.method)
    tensors = read_tensors(path, finite=True)  # a damaged or diverged adapter: refused, naming its tensors
    with torch.no_grad(), damaged(path):  # e.g. a tensor missing from a foreign file
        adapted.method.load_tensors(adapted, tensors, path)


def read_adapter_config(folder: Path) -> dict:
    config = read_json(folder / ADAPTER_CONFIG, advice="")
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG} must hold a JSON object")
    return config


def refuse_pickled(expected: Path) -> None:
    """Where `expected` (a safetensors file) is missing but its folder holds pickled weights, say why they are not read."""
    folder = expected.parent
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise UserError(f"{folder} has no {expected.name}, only pickled weights ({', '.join(pickled)}); pickled weights "
                        f"are not loaded because unpickling can run arbitrary code; convert to safetensors "
                        f"(e.g. safetensors.torch.save_file of torch.load(..., weights_only=True)) in a trusted place")


def weights_path(folder: Path, method: Method) -> Path:
    """The safetensors file `load_into` will read for `method`; refuses a missing or pickled-only one up front."""
    path = folder / method.weights_file
    if not path.exists():
        refuse_pickled(path)
        raise UserError(f"missing weights file {path}")
    require_file(path, "weights file")  # a folder or a named pipe by that name: say so
    return path


def unused_keys(adapted: Adapted, folder: Path) -> list[str]:
    """Tensors of the adapter file in `folder` that `load_into` does not use (e.g. LoRA on an embedding layer)."""
    path = weights_path(folder, adapted.method)
    with damaged(path), safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    return sorted(keys - set(adapted.method.saved_tensors(adapted)))
