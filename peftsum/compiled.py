"""Training-time regional compilation: `torch.compile` on each transformer block, one compiled graph shared by all.

Compiling the whole model inlines its 30 blocks into one graph, and took 179 s on a 2-core CPU; compiling the block
compiles one graph (plus its backward) that every block reuses, in ~40 s cold and a few seconds once inductor's disk
cache holds it. What it buys is fusion: a training step of a small model on a CPU is bound by memory-bound element-wise
work (RMSNorm's up-casts, rotary embeddings, SwiGLU, residual adds, the softmax of attention), which inductor fuses
into a few vectorised loops. Sequence length and batch size are symbolic from the start (`dynamic=True`), so
length-grouped batches do not recompile per length.

On the CPU, attention switches from SDPA to the plain (eager) formulation while compiled: PyTorch's CPU
flash-attention backward ran at ~16 ms a layer for 8 x 256 tokens (a quarter of the step), while matmul + softmax,
fused by inductor, costs far less. Eager attention stores the T x T probabilities for the backward, so beyond
`EAGER_ATTENTION_MAX_LENGTH` tokens SDPA stays.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
from torch import nn

from .errors import UserError
from .models import transformer_blocks

EAGER_ATTENTION_MAX_LENGTH = 512


def check_compiler(device: torch.device) -> None:
    """Inductor writes C++ for the CPU: without a compiler, say so before the first step rather than in a traceback."""
    if device.type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "g++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise UserError("train.compile needs a C++ compiler (g++ or clang++) for torch.compile on the CPU; "
                        "install one or leave --compile out")


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, device: torch.device, max_length: int, enabled: bool = True):
    """Within the block, `model`'s transformer blocks run compiled (and on the CPU, with eager attention for short
    sequences); on exit the model is as it was: plain blocks, its own attention implementation."""
    if not enabled:
        yield
        return
    check_compiler(device)
    blocks = transformer_blocks(model)
    attention = getattr(model.config, "_attn_implementation", None)
    swap = device.type == "cpu" and attention == "sdpa" and max_length <= EAGER_ATTENTION_MAX_LENGTH
    if swap:
        model.set_attn_implementation("eager")
    for block in blocks:
        block.compile(dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            # nn.Module.compile keeps the compiled call here; clearing it restores the plain forward (for generation,
            # whose key/value cache the compiled training graph was not built for).
            block._compiled_call_impl = None
        if swap:
            model.set_attn_implementation(attention)


@contextlib.contextmanager
def paused(model: nn.Module):
    """Within the block, compiled blocks run their plain forward (validation during training: no-grad passes and
    generation, which the compiled training graph was not built for); compiled again after. A no-op otherwise."""
    blocks = transformer_blocks(model)
    saved = [block._compiled_call_impl for block in blocks]
    for block in blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, call in zip(blocks, saved):
            block._compiled_call_impl = call
