"""LN-tuning's settings (`lntuning.*`) and the rules they must follow; torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules import require


@dataclass
class LnTuningConfig:
    # Normalisation modules (names or name suffixes, peft's rule) whose weight, and bias where they have one, train;
    # default per architecture, as peft's (llama: input_layernorm, post_attention_layernorm, norm; gpt2: ln_1, ln_2,
    # ln_f; gemma3: those of llama plus pre/post_feedforward_layernorm), else every normalisation module.
    targets: list[str] | None = None
    # A guess until tuned (docs/defaults.md has not measured it): norm weights are per-channel scales near 1, as IA3's
    # vectors are (1e-2, measured), and AdamW moves each by about lr a step, so LoRA's 5e-4 would barely move them in
    # a short run; half of IA3's rate because every scale here acts on the whole residual stream of its block.
    lr: float = 5e-3

    def check(self, cfg) -> None:
        """Refuse targets that cannot name a module (`cfg`: the whole run config) in one line."""
        require(self.targets is None or len(self.targets) > 0,
                "lntuning.targets is empty; name normalisation modules (e.g. input_layernorm, norm), or leave it unset "
                "for the architecture's")
        for target in self.targets or []:
            require(bool(target) and not any(c.isspace() for c in target) and not target.startswith(".")
                    and not target.endswith("."),
                    f"lntuning.targets {target!r} is not a module name (or suffix of one), e.g. input_layernorm, "
                    f"ln_f, model.norm")


SETTINGS = LnTuningConfig
