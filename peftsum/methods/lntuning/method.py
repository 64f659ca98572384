"""LN-tuning: only the normalisation layers train (their weight, and bias where they have one), everything else frozen.

peft (`LNTuningConfig`) wraps each target in a layer that trains a copy of it beside the frozen original; peftsum
trains the model's own norms in place, which computes the same thing with nothing attached, so generation and export
need no merging: the trained norms are the model's weights. On disk the result is peft's: `adapter_config.json` with
peft_type LN_TUNING and `adapter_model.safetensors` under peft's keys (`base_model.model.<module>.ln_tuning_layers.
<weight|bias>`), so adapters load both ways. The defaults per architecture are peft's
(TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING); an architecture peft does not list gets every
normalisation module, whose names the adapter_config.json then lists for peft.

Unlike peft, the targets must be normalisation layers: peft would train a copy of any module named (a whole
attention projection), which is another method.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import RunConfig
from ...errors import UserError
from ..base import Adapted, Method, check_shape
from ..targets import PEFT_PREFIX, matches
from .config import LnTuningConfig

# peft 0.21.2's mapping, its decoder-only entries (the others are encoder-decoder or multimodal models).
DEFAULT_TARGETS = {
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    **{t: ["input_layernorm", "post_attention_layernorm", "norm"] for t in ("llama", "mistral", "gemma")},
    **{t: ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
           "norm"] for t in ("gemma2", "gemma3_text")},
    **{t: ["post_attention_layernorm"] for t in ("qwen2", "qwen3")},
}
PEFT_KEY = "ln_tuning_layers"  # peft's saved key: base_model.model.<module>.ln_tuning_layers.weight
# peft LN-tuning options that change what is trained and that peftsum does not implement (targets name the layers).
UNSUPPORTED_PEFT_OPTIONS = ("exclude_modules", "modules_to_save")


def is_norm(module: nn.Module) -> bool:
    """Whether the module is a normalisation layer (LayerNorm, LlamaRMSNorm, Gemma3RMSNorm...), by its class name."""
    return "norm" in type(module).__name__.lower()


def chosen_targets(model: nn.Module, cfg: LnTuningConfig) -> list[str]:
    """The user's targets, else peft's for the architecture, else the name of every normalisation module."""
    if cfg.targets is not None:
        return cfg.targets
    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    suffixes = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and is_norm(module)]
    return list(dict.fromkeys(suffixes))


def norm_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the modules `targets` match (peft's rule); refuses a match that is no normalisation layer."""
    names = [name for name, _ in model.named_modules() if name and matches(name, targets)]
    norms = [name for name, module in model.named_modules() if name and is_norm(module)]
    model_type = getattr(model.config, "model_type", "") or "model"
    if not names:
        raise UserError(f"lntuning.targets {targets} match no module of this {model_type}; its normalisation layers "
                        f"include {', '.join(norms[:4])}")
    others = [name for name in names if not is_norm(model.get_submodule(name))]
    if others:
        raise UserError(f"lntuning.targets {targets} match {others[0]} "
                        f"({type(model.get_submodule(others[0])).__name__}), which is not a normalisation layer; "
                        f"LN-tuning trains normalisation layers only, e.g. {', '.join(norms[:4])}")
    return names


def apply(model: nn.Module, cfg: LnTuningConfig) -> dict[str, nn.Module]:
    """Freeze the model except the target norms; returns {module name: norm}."""
    model.requires_grad_(False)
    norms = {name: model.get_submodule(name) for name in norm_names(model, chosen_targets(model, cfg))}
    if not [p for norm in norms.values() for p in norm.parameters()]:
        raise UserError(f"lntuning.targets {chosen_targets(model, cfg)} match only normalisation layers without "
                        f"weights (elementwise_affine=False): nothing would train")
    for norm in norms.values():
        norm.requires_grad_(True)
    return norms


def describe(model: nn.Module, cfg: LnTuningConfig, norms: dict[str, nn.Module]) -> str:
    biases = any(getattr(norm, "bias", None) is not None for norm in norms.values())
    return (f"LN-tuning: the weights{' and biases' if biases else ''} of {', '.join(chosen_targets(model, cfg))} "
            f"({len(norms)} normalisation layers)")


def _key(parameter_name: str) -> str:
    """peft's key for a model parameter `<module>.<weight|bias>`: the copy peft trains sits in ln_tuning_layers."""
    module, leaf = parameter_name.rsplit(".", 1)
    return f"{PEFT_PREFIX}{module}.{PEFT_KEY}.{leaf}"


class LnTuningMethod(Method):
    name = "lntuning"
    title = "LN-tuning"
    tags = ("ln-tuning",)
    peft_type = "LN_TUNING"

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        norms = apply(model, cfg.lntuning)
        trainable = [p for norm in norms.values() for p in norm.parameters()]
        return Adapted(self, model, trainable, describe(model, cfg.lntuning, norms))

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        return {_key(name): p for name, p in adapted.named_trainable().items()}

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        with torch.no_grad():
            for name, param in adapted.named_trainable().items():
                key = _key(name)
                if key not in tensors:
                    raise UserError(f"{path}: no tensor {key} for this base model's {name}")
                check_shape(path, key, tensors[key].shape, param.shape)
                param.copy_(tensors[key])

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "target_modules": chosen_targets(adapted.model, cfg.lntuning), "exclude_modules": None,
            "modules_to_save": None, "inference_mode": True,
        }

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        unsupported = [k for k in UNSUPPORTED_PEFT_OPTIONS if adapter_config.get(k) not in (None, {}, [], "")]
        if unsupported:
            raise UserError(f"{where}: LN-tuning options not supported by peftsum: {', '.join(unsupported)} "
                            f"(supported: target_modules as a list)")
        targets = adapter_config.get("target_modules")
        if isinstance(targets, str):
            raise UserError(f"{where}: target_modules is the regular expression {targets!r}; peftsum matches a list "
                            f"of module names (suffixes) only; list the modules instead, e.g. [\"input_layernorm\"]")
        if targets is not None and (not isinstance(targets, list) or not targets
                                    or not all(isinstance(t, str) for t in targets)):
            raise UserError(f"{where}: target_modules must be a non-empty list of module names, got {targets!r}")
        cfg.lntuning.targets = targets  # None: peft's default for the architecture, which is peftsum's too


METHOD = LnTuningMethod()
