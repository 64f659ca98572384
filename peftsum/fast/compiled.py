"""How the transformer blocks run in training: compiled (`torch.compile` on the block, one graph shared by all),
with joined projections (fused.py), with gradient checkpointing; and whether compiling pays (`should_compile`).

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

Each block's call goes through `nn.Module._compiled_call_impl`, a private attribute: it is what the public
`nn.Module.compile` sets (torch 2.13: `self._compiled_call_impl = torch.compile(self._call_impl, ...)`) and what
`nn.Module.__call__` runs in place of `_call_impl` when set. The public method can only compile the block's own call;
torch has no public way to give the block another call (the joined forward, a checkpointed one) or to undo
`compile()`. Setting the attribute keeps the model's classes and forward code as they are, and clearing it on exit
makes the model plain again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.models import transformer_blocks
from ..errors import UserError
from . import fused

EAGER_ATTENTION_MAX_LENGTH = 512

# train.compile auto, on a CPU computing in bf16: compile once the run's planned training tokens reach this many.
# Measured with benchmarks/bench.py (BENCHMARKS.md, "Compiling: when it pays"): on the 2-core Zen 4, over two runs,
# a cold compile (empty inductor cache) costs 28-66 s and compiled steps are 1.27-1.42x faster, so compiling pays
# after 44-56k (head fine-tuning), 49-60k (prompt) and 87-104k (LoRA) tokens; on the 2-core Xeon with AMX after
# 40-60k. The threshold sits above all of them, so auto never makes a run slower than plain training on either.
CPU_BREAK_EVEN_TOKENS = 110_000
# The same under a time budget (train.budget_seconds): compiling pays after cost x speed-up / (speed-up - 1) seconds,
# 113-230 s on the Zen 4 for the same three methods.
CPU_BREAK_EVEN_SECONDS = 240.0
# In fp32 (a CPU without native bf16, or --model.precision fp32) auto does not compile on a CPU: on the Zen 4 the
# compiled steps were 0.93-1.22x the plain ones over four bench.py runs (median ~1.0x; the latest 0.98x LoRA, 0.95x
# prompt, 1.00x head fine-tuning), after a 25-66 s compile; the matmuls are most of an fp32 step, and inductor does
# not make them faster.


def has_compiler() -> bool:
    return any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++"))


def check_compiler(device: torch.device) -> None:
    """Inductor writes C++ for the CPU: without a compiler, say so before the first step rather than in a traceback."""
    if device.type == "cpu" and not has_compiler():
        raise UserError("train.compile needs a C++ compiler (g++ or clang++) for torch.compile on the CPU; "
                        "install one or set --train.compile false")


def should_compile(setting: str, device: torch.device, planned_tokens: int | None,
                   budget_seconds: float = 0.0, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether training compiles its blocks: `setting` true/false decides; auto compiles where it was measured to
    pay: on a GPU always; on a CPU (with a C++ compiler) computing in bf16 (`dtype`) when the planned work passes the
    break-even above, in fp32 never."""
    if setting != "auto":
        return setting == "true"
    if device.type == "cuda":
        return True
    if device.type != "cpu" or dtype == torch.float32 or not has_compiler():
        return False
    if budget_seconds:
        return budget_seconds >= CPU_BREAK_EVEN_SECONDS
    return planned_tokens is None or planned_tokens >= CPU_BREAK_EVEN_TOKENS


def _call_joined(block: nn.Module, *args, **kwargs):
    return fused.joined_forward(block, *args, **kwargs)


@functools.cache
def _compiled_joined():
    """One compiled function for every block of every model: dynamo guards on the blocks' structure, not their
    identity, so the 30 blocks (and the next method's copy of the model) reuse its graph. Made at first use: importing
    torch's compiler takes ~2 s, which commands that only generate need not spend."""
    return torch.compile(_call_joined, dynamic=True)


def _checkpointed(call):
    @functools.wraps(call)
    def run(*args, **kwargs):
        return checkpoint(call, *args, use_reentrant=False, **kwargs)
    return run


@contextlib.contextmanager
def training_blocks(model: nn.Module, device: torch.device, max_length: int, *, compile: bool = True,
                    gradient_checkpointing: bool = False, cached_prefix: bool = False):
    """Within the block, `model`'s transformer blocks run compiled (on the CPU with eager attention for short
    sequences, with joined projections where `fused.joinable`) and/or checkpointed; on exit the model is as it was:
    plain blocks, its own weights' storage, its own attention implementation. `cached_prefix`: the blocks train with
    a key/value prefix in their cache (prefix tuning), which the joined forward has no place for."""
    if not compile and not gradient_checkpointing:
        yield
        return
    if gradient_checkpointing and cached_prefix:  # recomputing a block would write its keys into the cache again
        raise UserError("train.gradient_checkpointing does not work with prefix tuning yet (its prefix lives in the "
                        "key/value cache that each block's recomputation would extend again); set it to false")
    blocks = transformer_blocks(model)
    attention = getattr(model.config, "_attn_implementation", None)
    swap = compile and device.type == "cpu" and attention == "sdpa" and max_length <= EAGER_ATTENTION_MAX_LENGTH
    joined = compile and not cached_prefix and fused.joinable(model)
    if compile:
        check_compiler(device)
    with fused.joined_projections(model) if joined else contextlib.nullcontext():
        if swap:
            model.set_attn_implementation("eager")
        for block in blocks:
            if joined:
                call = functools.partial(_compiled_joined(), block)
            elif compile:
                call = torch.compile(block._call_impl, dynamic=True)
            else:
                call = block._call_impl
            block._compiled_call_impl = _checkpointed(call) if gradient_checkpointing else call
        try:
            yield
        finally:
            for block in blocks:
                # Clearing the call restores the plain forward (for generation, whose key/value cache the compiled
                # training graph was not built for).
                block._compiled_call_impl = None
            if swap:
                model.set_attn_implementation(attention)


@contextlib.contextmanager
def paused(model: nn.Module):
    """Within the block, compiled (or checkpointed) blocks run their plain forward (validation during training:
    no-grad passes and generation, which the compiled training graph was not built for); as before after. A no-op
    otherwise."""
    blocks = transformer_blocks(model)
    saved = [block._compiled_call_impl for block in blocks]
    for block in blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, call in zip(blocks, saved):
            block._compiled_call_impl = call
