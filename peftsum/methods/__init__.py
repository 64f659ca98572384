"""The three adaptation methods behind one small interface: `adapt(model, tokenizer, method, cfg)`.

Each method lives in its own module (lora.py, prompt.py, finetune.py) with an `apply` entry point; this file only
dispatches and carries what training and evaluation need to know about the result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import RunConfig
from ..models import compute_dtype, count_parameters
from . import finetune, lora, prompt


@dataclass
class Adapted:
    """A model prepared for one method: which parameters train, and the soft prompt if there is one."""

    method: str
    model: nn.Module
    trainable: list[nn.Parameter]
    description: str
    soft_prompt: prompt.SoftPrompt | None = None
    frozen_dtype: torch.dtype = torch.float32  # how the frozen weights are stored; the activations follow it

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
    """Prepare `model` (modified in place) for training with `method`.

    Frozen weights are then stored in the compute precision (bf16 where the hardware has it): autocast would
    otherwise re-cast every frozen matrix at every step, and bf16 activations halve the memory traffic of the
    element-wise work that dominates small models on a CPU. Trainable parameters stay fp32, as does their optimizer state.
    """
    adapted = _apply(model, tokenizer, method, cfg)
    device = next(model.parameters()).device
    adapted.frozen_dtype = store_frozen_in(model, compute_dtype(cfg.model.precision, device))
    embedding = model.get_input_embeddings()
    if embedding.weight.requires_grad and embedding.weight.dtype != adapted.frozen_dtype:
        # A trainable (fp32) embedding feeds frozen bf16 blocks, also for the tokens generate() embeds itself:
        # its output takes the frozen weights' dtype, since some CPU kernels (layer_norm) refuse mixed inputs.
        embedding.register_forward_hook(lambda module, args, output: output.to(adapted.frozen_dtype))
    return adapted


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """Cast the frozen floating-point parameters to `dtype`; returns the dtype the frozen weights now have."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for param in frozen:
        param.data = param.data.to(dtype)
    return dtype if frozen else torch.float32


def _apply(model: nn.Module, tokenizer, method: str, cfg: RunConfig) -> Adapted:
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


def untouched(model: nn.Module, dtype: torch.dtype = torch.float32) -> Adapted:
    """The base model as it is (stored in `dtype`, in place): the 'before training' reference for every method."""
    model.requires_grad_(False)
    return Adapted("base", model, [], "untouched base model", frozen_dtype=store_frozen_in(model, dtype))
