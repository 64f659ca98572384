"""`eval.quantize int8`: generation with int8 matmuls for the model's linear layers (CPU only).

Each frozen weight is stored as int8 with one scale per output row; each product quantizes its input on the fly with
one scale per row (per token), multiplies in int32 on the CPU's int8 dot-product instructions (`torch._int_mm`:
oneDNN, VNNI where the CPU has it), and scales the result back. Per-token scales are what keep the summaries: with
one scale for a whole call (fbgemm's dynamic linear), a token with a large activation coarsens every other row of
the batch, and the embedded model lost 6 ROUGE-1 points on 64 XSum documents (14.6 -> 8.5); per token it scores
within noise of the unquantized model (BENCHMARKS.md). Only generation uses it, after LoRA is merged into the
weights; the loss, training and the model itself stay as they were. It is opt-in because the summaries change (a
little), and the report says when it was used.

decode.py multiplies by these weights directly (`LeanDecoder(..., int8=True)`); a model it does not cover generates
through its own forward with every linear layer swapped for an `Int8Linear` (`int8_linears`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from ..methods.base import unhooked
from ..methods.targets import linear_weight


class Int8Weight(NamedTuple):
    values: torch.Tensor  # (out, in) int8, as the nn.Linear's weight is laid out
    scales: torch.Tensor  # (out,) fp32: row i of the weight is values[i] * scales[i]


def int8_weight(weight: torch.Tensor) -> Int8Weight:
    """A linear layer's weight (out, in) in int8, symmetric, one scale per output row."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return Int8Weight(torch.round(weight / scales[:, None]).to(torch.int8), scales)


def int8_product(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x @ weight.T in x's dtype: x quantized to int8 with one scale per row, the product in int32."""
    rows = x.reshape(-1, x.shape[-1])
    scales = rows.abs().amax(dim=-1, keepdim=True).float().clamp_min_(torch.finfo(torch.float32).tiny) / 127
    # One dtype per element-wise op: with mixed dtypes (int32 by fp32, bf16 by fp32) PyTorch takes a scalar path,
    # ~6x slower here (1910 x 3072: 19 ms against 3.2 ms), which cost more than int8 saved.
    quantized = rows.to(torch.float32, copy=True).div_(scales).round_().to(torch.int8)
    out = torch._int_mm(quantized, weight.values.t()).float().mul_(scales).mul_(weight.scales)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def check_int8(device: torch.device) -> None:
    """Refuse int8 where it cannot run, in one line."""
    if device.type != "cpu":
        raise UserError(f"eval.quantize int8 runs on the CPU only (int8 matmuls through oneDNN); this run is on "
                        f"{device}: set --eval.quantize none")
    if not torch.backends.mkldnn.is_available():
        raise UserError("eval.quantize int8 needs PyTorch's oneDNN (mkldnn) kernels, which this build lacks: set "
                        "--eval.quantize none")


class Int8Linear(nn.Module):
    """A frozen linear layer (nn.Linear or Conv1D) as an int8 matmul; takes and returns the activations' own
    dtype."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        weight = linear_weight(linear)
        self.out_features, self.in_features = weight.shape
        self.quantized = int8_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_product(x, self.quantized)
        return out if self.bias is None else (out + self.bias).to(x.dtype)


@contextlib.contextmanager
def int8_linears(model: nn.Module, device: torch.device):
    """Within the block, every linear layer of `model` (the LM head included) is an `Int8Linear`; on exit the model
    holds its own layers again."""
    check_int8(device)
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) in (nn.Linear, Conv1D)]  # Conv1D: GPT-2's linear layers
    for _, name, child in swapped:
        if not unhooked(child):  # a bug, not a user error: what its hook adds would be left behind
            raise RuntimeError(f"int8 would drop what a hook on {name} computes (an unmerged adapter?)")
    try:
        for parent, name, child in swapped:
            setattr(parent, name, Int8Linear(child))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
