"""P-tuning's settings (`ptuning.*`) and the rules they must follow; torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules import check_virtual_tokens, require


@dataclass
class PtuningConfig:
    num_virtual_tokens: int = 10
    encoder_reparameterization_type: str = "mlp"  # mlp | lstm: the prompt encoder (peft's PromptEncoderConfig)
    encoder_hidden_size: int = 0  # 0 = the model's hidden size (peft's default)
    encoder_num_layers: int = 2  # LSTM layers (peft's MLP always has three linear layers)
    encoder_dropout: float = 0.0  # between LSTM layers
    lr: float = 1e-2  # measured: 3e-3 to 3e-2 alike; the encoder, not the rate, is slow to start (docs/defaults.md)

    def check(self, cfg) -> None:
        """Refuse impossible P-tuning settings (`cfg`: the whole run config) in one line."""
        kind = self.encoder_reparameterization_type
        require(kind in ("mlp", "lstm"), f"ptuning.encoder_reparameterization_type must be mlp or lstm, got {kind!r}")
        require(self.encoder_hidden_size >= 0,
                f"ptuning.encoder_hidden_size must be >= 0 (0 = the model's hidden size), got {self.encoder_hidden_size}")
        require(self.encoder_num_layers >= 1, f"ptuning.encoder_num_layers must be >= 1, got {self.encoder_num_layers}")
        require(0 <= self.encoder_dropout < 1, f"ptuning.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        require(kind == "lstm" or (self.encoder_num_layers == 2 and self.encoder_dropout == 0),
                "ptuning.encoder_num_layers and ptuning.encoder_dropout apply to the lstm encoder only (peft's mlp "
                "encoder has three linear layers and no dropout); set ptuning.encoder_reparameterization_type lstm or "
                "leave them")
        require(self.encoder_dropout == 0 or self.encoder_num_layers >= 2,
                "ptuning.encoder_dropout acts between LSTM layers: it needs ptuning.encoder_num_layers >= 2")
        check_virtual_tokens("ptuning", self.num_virtual_tokens, cfg.data)


SETTINGS = PtuningConfig
