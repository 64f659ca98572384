"""Fine-tuning's settings (`finetune.*`) and the rules they must follow; torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules import require


@dataclass
class FinetuneConfig:
    head: bool = True  # train the LM head (tied to the input embeddings where the model ties them)
    last_blocks: int = 0  # also train the last K transformer blocks and the final norm
    all: bool = False  # train every parameter
    lr: float = 5e-4  # measured for the head (docs/defaults.md); lower it when training many blocks or all

    def check(self, cfg) -> None:
        """Refuse impossible fine-tuning settings (`cfg`: the whole run config) in one line."""
        require(self.last_blocks >= 0, f"finetune.last_blocks must be >= 0, got {self.last_blocks}")
        require(self.head or self.last_blocks > 0 or self.all,
                "finetune trains nothing: set finetune.head, finetune.last_blocks > 0 or finetune.all")


SETTINGS = FinetuneConfig
