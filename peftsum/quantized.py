"""`eval.quantize int8`: generation with dynamic int8 matmuls for the model's linear layers (CPU only).

Decoding a token reads every weight of the model; stored as int8 (one scale per output row) the weights are half
their bf16 size, and the products run on the CPU's int8 dot-product instructions (VNNI), the activations quantized
on the fly per call. Only generation uses it, after LoRA is merged into the weights; the loss, training and the
model itself stay as they were. It is opt-in because the summaries change (a little): BENCHMARKS.md measures the
speed and the ROUGE against bf16, and the report says when it was used.

Built on `torch.ao.nn.quantized.dynamic.Linear` (fbgemm), which PyTorch deprecates in favour of torchao but still
ships in 2.13.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .errors import UserError


class Int8Linear(nn.Module):
    """A frozen nn.Linear as a dynamic int8 matmul; takes and returns the activations' own dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        float_linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            float_linear.weight.copy_(linear.weight.float())
            if linear.bias is not None:
                float_linear.bias.copy_(linear.bias.float())
        float_linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice of torch.ao quantization
            self.quantized = torch.ao.nn.quantized.dynamic.Linear.from_float(float_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x.float()).to(x.dtype)


@contextlib.contextmanager
def int8_linears(model: nn.Module, device: torch.device):
    """Within the block, every nn.Linear of `model` (the LM head included) is an `Int8Linear`; on exit the model
    holds its own layers again."""
    if device.type != "cpu":
        raise UserError(f"eval.quantize int8 runs on the CPU only (dynamic int8 matmuls); this run is on {device}: "
                        f"set --eval.quantize none")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError("eval.quantize int8 needs PyTorch's fbgemm engine, which this build lacks: set "
                        "--eval.quantize none")
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
