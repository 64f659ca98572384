"""Prefix tuning's settings (`prefix.*`) and the rules they must follow; torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules import check_virtual_tokens, require


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 10  # prefix length: keys and values this many positions long, in every layer
    init: str = "text"  # text (the keys/values the model computes for init_text) | random (peft's: unit normal)
    init_text: str = "Summarize the following article in one or two sentences:"
    projection: bool = False  # train the prefix through peft's reparameterisation MLP (prefix_projection)
    encoder_hidden_size: int = 0  # that MLP's hidden width; 0 = the key/value width (peft's default)
    lr: float = 1e-2  # measured: 1e-2 to 3e-2 alike in the chat format; 3e-3 learns slower (docs/defaults.md)

    def check(self, cfg) -> None:
        """Refuse impossible prefix-tuning settings (`cfg`: the whole run config) in one line."""
        require(self.init in ("text", "random"), f"prefix.init must be text or random, got {self.init!r}")
        require(self.encoder_hidden_size >= 0,
                f"prefix.encoder_hidden_size must be >= 0 (0 = the key/value width), got {self.encoder_hidden_size}")
        check_virtual_tokens("prefix", self.num_virtual_tokens, cfg.data)


SETTINGS = PrefixConfig
