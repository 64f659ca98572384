"""Finding and reading the linear layers a method attaches to: peft's target-matching rule, and the weight layout of
nn.Linear and GPT-2's Conv1D (shared by LoRA and IA3)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError

PEFT_PREFIX = "base_model.model."  # peft's key prefix: base_model.model.<module>.lora_A.weight


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in nn.Linear layout (out x in): Conv1D's (in x out) transposed (a view)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear or Conv1D layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D: (in, out)
    return in_features, out_features


def matches(name: str, patterns: list[str]) -> bool:
    """peft's rule for a list of targets: the module's full name is a pattern or ends with '.' + a pattern."""
    return any(name == t or name.endswith("." + t) for t in patterns)


def target_names(model: nn.Module, patterns: list[str], section: str) -> list[str]:
    """Full names of the linear/Conv1D modules that match `patterns` (`section` names the setting in errors)."""
    model_type = getattr(model.config, "model_type", "")
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, Conv1D)) and matches(name, patterns)]
    if not names:
        raise UserError(f"{section}.targets {patterns} match no linear layer of this {model_type or 'model'}; "
                        f"examples of layer names: {', '.join(_linear_names(model)[:6])}")
    return names


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
