"""(IA)^3's settings (`ia3.*`) and the rules they must follow; torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules import require


@dataclass
class Ia3Config:
    # Modules whose output (attention keys/values) or, for `feedforward`, input is scaled by a learned vector;
    # default per architecture, as peft's (llama: k_proj, v_proj and down_proj's input; gpt2: c_attn, mlp.c_proj).
    targets: list[str] | None = None
    feedforward: list[str] | None = None  # the targets scaled on their input; default: the architecture's among targets
    lr: float = 1e-2  # IA3 learns only scales starting at 1: far larger steps than LoRA's

    def check(self, cfg) -> None:
        """Refuse impossible (IA)^3 settings (`cfg`: the whole run config) in one line."""
        require(self.targets is None or len(self.targets) > 0, "ia3.targets is empty; name modules, or leave it unset")
        if self.targets is not None and self.feedforward is not None:
            extra = [m for m in self.feedforward if m not in self.targets]
            require(not extra, f"ia3.feedforward {extra} must be among ia3.targets {self.targets}")


SETTINGS = Ia3Config
