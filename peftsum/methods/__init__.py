"""The three adaptation methods behind one small interface: `adapt(model, tokenizer, method, cfg)`.

Each method lives in its own module (lora.py, prompt.py, finetune.py) with an `apply` entry point; this file only
dispatches and carries what training and evaluation need to know about the result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from ..config import RunConfig
from ..models import count_parameters
from . import finetune, lora, prompt


@dataclass
class Adapted:
    """A model prepared for one method: which parameters train, and the soft prompt if there is one."""

    method: str
    model: nn.Module
    trainable: list[nn.Parameter]
    description: str
    soft_prompt: prompt.SoftPrompt | None = None

    @property
    def virtual_tokens(self) -> int:
        return self.soft_prompt.num_virtual_tokens if self.soft_prompt is not None else 0

    def parameter_counts(self) -> dict:
        extra = [self.soft_prompt.embeddings] if self.soft_prompt is not None else []
        total, trainable = count_parameters(self.model, extra)
        return {"total": total, "trainable": trainable, "trainable_percent": 100.0 * trainable / total,
                "description": self.description}

    @contextlib.contextmanager
    def for_generation(self):
        """LoRA merged into the weights while generating: same outputs, no extra matmuls per token."""
        if self.method == "lora":
            lora.merge(self.model)
            try:
                yield
            finally:
                lora.unmerge(self.model)
        else:
            yield


def adapt(model: nn.Module, tokenizer, method: str, cfg: RunConfig) -> Adapted:
    """Prepare `model` (modified in place) for training with `method`."""
    if method == "lora":
        adapters = lora.apply(model, cfg.lora)
        params = [p for a in adapters.values() for p in a.parameters()]
        return Adapted(method, model, params, lora.describe(model, cfg.lora, adapters))
    if method == "prompt":
        soft = prompt.apply(model, tokenizer, cfg.prompt, seed=cfg.train.seed)
        return Adapted(method, model, [soft.embeddings], prompt.describe(cfg.prompt), soft_prompt=soft)
    if method == "finetune":
        params = finetune.apply(model, cfg.finetune)
        return Adapted(method, model, params, finetune.describe(model, cfg.finetune))
    raise ValueError(f"unknown method {method!r}")


def untouched(model: nn.Module) -> Adapted:
    """The base model as it is: the 'before training' reference for every method."""
    model.requires_grad_(False)
    return Adapted("base", model, [], "untouched base model")
