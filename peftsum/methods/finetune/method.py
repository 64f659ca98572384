"""Traditional fine-tuning: unfreeze the LM head, the last K transformer blocks (with the final norm), or all.

When the model ties its LM head to the input embeddings, training the head trains the embeddings too; the
description says so, because the parameter count and the effect on the input side both follow from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import RunConfig
from ...core.models import final_norms, ties_embeddings, transformer_blocks
from ...errors import UserError
from ..base import Adapted, Method, check_shape
from .config import FinetuneConfig


def apply(model: nn.Module, cfg: FinetuneConfig) -> list[nn.Parameter]:
    """Freeze everything except the chosen parts; returns the trainable parameters."""
    if cfg.all:
        model.requires_grad_(True)
        return [p for p in model.parameters()]
    model.requires_grad_(False)
    if cfg.head:
        model.get_output_embeddings().weight.requires_grad_(True)
    if cfg.last_blocks:
        blocks = transformer_blocks(model)
        if cfg.last_blocks > len(blocks):
            raise UserError(f"finetune.last_blocks ({cfg.last_blocks}) exceeds the model's {len(blocks)} blocks")
        for block in list(blocks)[-cfg.last_blocks:]:
            block.requires_grad_(True)
        for norm in final_norms(model):
            norm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def describe(model: nn.Module, cfg: FinetuneConfig) -> str:
    if cfg.all:
        return "all parameters"
    parts = []
    if cfg.head:
        parts.append(_head(model))
    if cfg.last_blocks:
        total = len(transformer_blocks(model))
        parts.append(f"last {cfg.last_blocks} of {total} blocks and the final norm")
    return " + ".join(parts)


def _head(model: nn.Module) -> str:
    """The head and its size, which a large vocabulary makes the bulk of a small model (Gemma 3 270M: 262,144 x 640
    = 167.8M of its 268.1M parameters); tied, it is the input embedding table too. Trained in fp32 with AdamW it
    needs 16 bytes a parameter: the weight, its gradient and two moments."""
    rows, columns = model.get_output_embeddings().weight.shape
    size = rows * columns
    tied = "tied to the input embeddings: " if ties_embeddings(model) else ""
    memory = size * 16
    memory_text = f"{memory / 1e9:.1f} GB" if memory >= 1e9 else f"{memory / 1e6:.3g} MB"
    return (f"LM head ({tied}{rows:,} x {columns:,} = {size:,} parameters; {memory_text} in training as fp32 "
            f"weight, gradient and AdamW moments)")


class FinetuneMethod(Method):
    """The trained tensors are saved under the model's own parameter names: no adapter, no peft form."""

    name = "finetune"
    title = "fine-tuning of selected weights"
    tags = ("fine-tuned",)
    weights_file = "finetuned.safetensors"

    def shards_with_fsdp(self, settings) -> bool:
        return settings.all

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        params = apply(model, cfg.finetune)
        return Adapted(self, model, params, describe(model, cfg.finetune))

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in adapted.model.named_parameters()}
        return {names[id(p)]: p for p in adapted.trainable}

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        params = dict(adapted.model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key not in params:
                    raise UserError(f"{path}: {key} is not a parameter of this base model")
                check_shape(path, key, value.shape, params[key].shape)
                params[key].copy_(value)


METHOD = FinetuneMethod()
