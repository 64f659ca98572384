"""Speed paths behind one door: what training and generation call to run faster than the plain transformers forward,
each with the same results (or, for int8, opt-in). The plain path never needs them: every function here falls back to
the model's own forward where its speed path does not apply, and the rest of peftsum imports only this package.

- **Compiled training blocks** (compiled.py, with fused.py's joined projections): `training_blocks(model, device,
  max_length, compile=..., gradient_checkpointing=...)` is a context in which the model's transformer blocks run
  through `torch.compile` (one graph shared by all blocks; on a plain Llama block, q/k/v and gate/up joined into one
  matmul each) and/or gradient checkpointing. The training loop enters it when `should_compile(train.compile, ...)`
  says compiling pays (always on a GPU; on a CPU in bf16 past a measured break-even; never in fp32 on a CPU) or when
  gradient checkpointing is on; `paused(model)` runs the plain forward inside it (validation and generation during
  training). Without it, the model's own forward trains: same losses up to float rounding.
- **The lean decoder** (decode.py): `generation(model, device, dtype, rows)` yields, for greedy decoding, a forward of
  a Llama model (SmolLM2) in a few tensor operations per block, over joined and pre-laid weights, or None where it
  would not compute exactly what the model's forward does (another architecture, an unmerged adapter's hook, beam
  search); `forward.greedy` then calls the model's forward. Same tokens either way (tests/test_generation.py).
- **int8 matmuls** (quantized.py): with `eval.quantize int8`, `generation(..., int8=True)` multiplies by int8
  weights with activations quantized per token, through the lean decoder where it covers the model, else with every
  linear layer swapped for an int8 one for the block; `check_int8(device)` refuses it, in one line, where it cannot
  run. Opt-in, since summaries change a little; the plain path multiplies in the model's own precision.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .compiled import paused, should_compile, training_blocks
from .decode import LeanDecoder
from .quantized import check_int8, int8_linears

__all__ = ["check_int8", "generation", "paused", "should_compile", "training_blocks"]


@contextlib.contextmanager
def generation(model: nn.Module, device: torch.device, dtype: torch.dtype, rows: int, *, lean: bool = True,
               int8: bool = False):
    """Within the block, `model` (as it generates: LoRA merged, say) generates as fast as peftsum can; yields the lean
    decoder for greedy decoding at up to `rows` rows computing in `dtype` (autocast's, or fp32 for none), or None where
    it would not be exact or `lean` is false (beam search). With `int8`, its products are int8, and where there is no
    decoder, int8 layers stand in for the model's linear layers until the block ends."""
    decoder = LeanDecoder.build(model, dtype, rows, int8) if lean else None
    with int8_linears(model, device) if int8 and decoder is None else contextlib.nullcontext():
        yield decoder
