"""Prompt tuning's settings (`prompt.*`) and the rules they must follow; torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules import check_virtual_tokens, require


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 10
    init: str = "text"  # text | vocab | random
    init_text: str = "Summarize the following article in one or two sentences:"
    lr: float = 1e-1  # measured: 3e-2 to 3e-1 score alike, far above what LoRA needs (docs/defaults.md)

    def check(self, cfg) -> None:
        """Refuse impossible prompt-tuning settings (`cfg`: the whole run config) in one line."""
        require(self.init in ("text", "vocab", "random"), f"prompt.init must be text, vocab or random, got {self.init!r}")
        check_virtual_tokens("prompt", self.num_virtual_tokens, cfg.data)


SETTINGS = PromptConfig
