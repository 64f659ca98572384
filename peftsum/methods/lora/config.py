"""LoRA's settings (`lora.*`) and the rules they must follow; torch-free, so bad settings are refused before torch
loads."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..rules import require

LORA_VARIANTS = ("lora", "dora", "rslora")
LORA_INITS = ("default", "pissa", "olora")  # and pissa_niter_N: PiSSA from a randomized SVD with N iterations


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # peft's default; with dropout each target layer draws its own mask every step
    targets: list[str] | None = None  # module names (suffixes); default chosen per architecture
    lr: float = 5e-4
    # lora: scale alpha / r | dora: weight-decomposed (a trained magnitude per output row times the normalised
    # direction W + BA) | rslora: scale alpha / sqrt(r), which keeps large ranks learning
    variant: str = "lora"
    # default: A random, B zero | pissa: A, B from the weights' top-r singular vectors (pissa_niter_N: randomized SVD,
    # N iterations) | olora: from their QR decomposition; both take B @ A out of the frozen weights, and the saved
    # adapter is the plain LoRA (rank 2r) that applies to the original weights, as peft converts them
    init: str = "default"
    lr_ratio: float = 1.0  # LoRA+: the B matrices (and DoRA magnitudes) learn at lr_ratio x lr; 1 = plain LoRA

    def check(self, cfg) -> None:
        """Refuse impossible LoRA settings (`cfg`: the whole run config) in one line."""
        require(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(self.variant in LORA_VARIANTS,
                f"lora.variant must be {', '.join(LORA_VARIANTS)}, got {self.variant!r}")
        require(self.init in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", self.init) is not None,
                f"lora.init must be {', '.join(LORA_INITS)} or pissa_niter_N (N >= 1), got {self.init!r}")
        require(not (self.variant == "dora" and self.init != "default"),
                f"lora.init {self.init} does not combine with lora.variant dora: the saved adapter must apply to the "
                f"original weights as a plain LoRA, which a DoRA magnitude is not (peft drops it in that conversion)")
        require(self.lr_ratio > 0, f"lora.lr_ratio must be > 0 (1 = plain LoRA), got {self.lr_ratio}")


SETTINGS = LoraConfig
