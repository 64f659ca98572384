"""Traditional fine-tuning: unfreeze the LM head, the last K transformer blocks (with the final norm), or all.

When the model ties its LM head to the input embeddings, training the head trains the embeddings too; the
description says so, because the parameter count and the effect on the input side both follow from it.
"""

from __future__ import annotations

from torch import nn

from ..config import FinetuneConfig
from ..errors import UserError
from ..models import final_norms, ties_embeddings, transformer_blocks


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
        parts.append("LM head (tied to the input embeddings)" if ties_embeddings(model) else "LM head")
    if cfg.last_blocks:
        total = len(transformer_blocks(model))
        parts.append(f"last {cfg.last_blocks} of {total} blocks and the final norm")
    return " + ".join(parts)
