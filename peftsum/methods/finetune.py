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
