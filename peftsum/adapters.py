"""Save and load what a method trained, in the Hugging Face `peft` layout where one exists.

LoRA and soft prompts are written as `adapter_config.json` + `adapter_model.safetensors` with peft's key names
(`base_model.model.<module>.lora_A.weight`, `prompt_embeddings`). Fine-tuning writes only the trained tensors,
under the model's own parameter names, to `finetuned.safetensors`. Only safetensors are read: no pickles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .errors import UserError
from .files import atomic_write, damaged, read_json, read_tensors, require_file, write_json
from .methods import Adapted, lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FINETUNED_WEIGHTS = "finetuned.safetensors"
PEFT_PREFIX = "base_model.model."
# Weight files in pickle-based formats (torch.save and friends): unpickling can run arbitrary code, so never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def _lora_modules(model) -> dict[str, lora.LoRA]:
    return {name: m.lora for name, m in model.named_modules() if isinstance(getattr(m, "lora", None), lora.LoRA)}


def save(adapted: Adapted, folder: Path, base_model: str, cfg) -> list[Path]:
    """Write the trained weights of `adapted` into `folder`; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    if adapted.method == "lora":
        modules = _lora_modules(adapted.model)
        tensors = {}
        for name, module in modules.items():
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B
        fan_in_fan_out = any(isinstance(adapted.model.get_submodule(n), Conv1D) for n in modules)
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
            "target_modules": lora.chosen_targets(adapted.model, cfg.lora.targets),
            "fan_in_fan_out": fan_in_fan_out, "bias": "none", "inference_mode": True,
        }
    elif adapted.method == "prompt":
        tensors = {"prompt_embeddings": adapted.soft_prompt.embeddings}
        model_config = adapted.model.config
        config = {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "num_virtual_tokens": adapted.virtual_tokens, "token_dim": tensors["prompt_embeddings"].shape[1],
            "num_transformer_submodules": 1, "num_attention_heads": model_config.num_attention_heads,
            "num_layers": model_config.num_hidden_layers,
            "prompt_tuning_init": "TEXT" if cfg.prompt.init == "text" else "RANDOM",
            "prompt_tuning_init_text": cfg.prompt.init_text if cfg.prompt.init == "text" else None,
            "tokenizer_name_or_path": base_model, "inference_mode": True,
        }
    else:
        names = {id(p): n for n, p in adapted.model.named_parameters()}
        path = folder / FINETUNED_WEIGHTS
        _save_tensors(path, {names[id(p)]: p for p in adapted.trainable})
        return [path]
    _save_tensors(folder / ADAPTER_WEIGHTS, tensors)
    write_json(folder / ADAPTER_CONFIG, config)
    return [folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG]


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        refuse_pickled(path)
        raise UserError(f"missing weights file {path}")
    return read_tensors(path)


def _check_shape(path: Path, key: str, got: torch.Size, want: torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise UserError(f"{path}: {key} has shape {tuple(got)}, but this base model needs {tuple(want)} "
                        f"(was the adapter trained on another model?)")


def load_into(adapted: Adapted, folder: Path) -> None:
    """Load trained weights saved by `save` into a freshly adapted model of the same configuration."""
    if adapted.method == "finetune":
        path = folder / FINETUNED_WEIGHTS
        tensors = _read(path)
        params = dict(adapted.model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key not in params:
                    raise UserError(f"{path}: {key} is not a parameter of this base model")
                _check_shape(path, key, value.shape, params[key].shape)
                params[key].copy_(value)
        return
    path = folder / ADAPTER_WEIGHTS
    tensors = _read(path)
    with torch.no_grad(), damaged(path):  # e.g. a prompt adapter without its prompt_embeddings
        if adapted.method == "prompt":
            _check_shape(path, "prompt_embeddings", tensors["prompt_embeddings"].shape, adapted.soft_prompt.embeddings.shape)
            adapted.soft_prompt.embeddings.copy_(tensors["prompt_embeddings"])
            return
        for name, module in _lora_modules(adapted.model).items():
            for part in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{name}.{part}.weight"
                if key not in tensors:
                    raise UserError(f"{path}: no tensor {key} for this base model's layer {name}")
                _check_shape(path, key, tensors[key].shape, getattr(module, part).shape)
                getattr(module, part).copy_(tensors[key])


def read_adapter_config(folder: Path) -> dict:
    config = read_json(folder / ADAPTER_CONFIG, advice="")
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG} must hold a JSON object")
    return config


# ---------------------------------------------------------------- checks before and after loading

def refuse_pickled(expected: Path) -> None:
    """Where `expected` (a safetensors file) is missing but its folder holds pickled weights, say why they are not read."""
    folder = expected.parent
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise UserError(f"{folder} has no {expected.name}, only pickled weights ({', '.join(pickled)}); pickled weights "
                        f"are not loaded because unpickling can run arbitrary code; convert to safetensors "
                        f"(e.g. safetensors.torch.save_file of torch.load(..., weights_only=True)) in a trusted place")


def weights_path(folder: Path, method: str) -> Path:
    """The safetensors file `load_into` will read for `method`; refuses a missing or pickled-only one up front."""
    path = folder / (FINETUNED_WEIGHTS if method == "finetune" else ADAPTER_WEIGHTS)
    if not path.exists():
        refuse_pickled(path)
        raise UserError(f"missing weights file {path}")
    require_file(path, "weights file")  # a folder or a named pipe by that name, say so
    return path


def expected_keys(adapted: Adapted) -> set[str]:
    """Tensor names that `load_into` reads for a LoRA or prompt adapter."""
    if adapted.method == "prompt":
        return {"prompt_embeddings"}
    return {f"{PEFT_PREFIX}{name}.{part}.weight" for name in _lora_modules(adapted.model) for part in ("lora_A", "lora_B")}


def unused_keys(adapted: Adapted, folder: Path) -> list[str]:
    """Tensors of the adapter file in `folder` that `load_into` does not use (e.g. LoRA on an embedding layer)."""
    from safetensors import safe_open

    with damaged(folder / ADAPTER_WEIGHTS), safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    return sorted(keys - expected_keys(adapted))
