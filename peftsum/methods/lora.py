"""LoRA: a low-rank update W + (alpha/r) * B @ A beside chosen linear layers, attached with forward hooks.

The base model's code and parameter names stay untouched: each target module gets a `lora` child holding A and B,
and a forward hook adds `B(A(dropout(x))) * scale` to its output. Merging folds the update into the weight (zero
overhead for generation); unmerging subtracts it again. GPT-2's Conv1D stores its weight as (in, out), which only
matters when merging.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig, RunConfig
from ..errors import UserError
from ..files import read_text
from . import Adapted, Method, check_shape, number

# PEFT's matching rule: a target names a module exactly or as a dotted suffix of its full name.
DEFAULT_TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],  # Gemma 3's text-only model (Gemma3ForCausalLM)
}
FALLBACK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value", "out_proj"]
PEFT_PREFIX = "base_model.model."  # peft's key prefix: base_model.model.<module>.lora_A.weight
# peft LoRA options that change what the adapter computes and that peftsum's LoRA does not implement.
UNSUPPORTED_PEFT_OPTIONS = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                            "lora_bias", "exclude_modules", "layer_replication", "target_parameters",
                            "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                            "kasa_config", "velora_config", "monteclora_config")


class LoRA(nn.Module):
    """The trainable pair (A: r x in, B: out x r); B starts at zero so the adapted model starts as the base."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank
        self.merged = False
        self.original: torch.Tensor | None = None  # the base weight while merged
        self.hook = None  # handle of the forward hook that adds the update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the activations' dtype: bf16 activations meet fp32 trainable weights when the frozen model is bf16.
        return F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """The weight update in nn.Linear layout (out x in)."""
        return (self.lora_B @ self.lora_A) * self.scale


def _add_update(module: nn.Module, args, output):
    lora = module.lora
    return output if lora.merged else output + lora(args[0])


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D: (in, out)
    return in_features, out_features


def chosen_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The user's target patterns, or the architecture's default."""
    return targets or DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), FALLBACK_TARGETS)


def target_names(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full names of the linear/Conv1D modules that LoRA attaches to."""
    model_type = getattr(model.config, "model_type", "")
    chosen = chosen_targets(model, targets)
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and any(name == t or name.endswith("." + t) for t in chosen)
    ]
    if not names:
        raise UserError(f"lora.targets {chosen} match no linear layer of this {model_type or 'model'}; "
                        f"examples of layer names: {', '.join(_linear_names(model)[:6])}")
    return names


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def apply(model: nn.Module, cfg: LoraConfig) -> dict[str, LoRA]:
    """Freeze the model and attach LoRA to the target modules; returns {module name: LoRA}."""
    model.requires_grad_(False)
    adapters = {}
    for name in target_names(model, cfg.targets):
        module = model.get_submodule(name)
        in_features, out_features = _features(module)
        lora = LoRA(in_features, out_features, cfg.rank, cfg.alpha, cfg.dropout).to(module.weight.device)
        module.lora = lora
        lora.hook = module.register_forward_hook(_add_update)
        adapters[name] = lora
    return adapters


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (the hook then adds nothing).

    The original weight is kept aside and restored by `unmerge`: subtracting the update again would not give the
    same bits back in bf16, and each evaluation would drift the base model a little.
    """
    for module in model.modules():
        lora = getattr(module, "lora", None)
        if isinstance(lora, LoRA) and not lora.merged:
            lora.original = module.weight.detach().clone()
            delta = lora.delta().to(module.weight.dtype)
            module.weight += delta if isinstance(module, nn.Linear) else delta.T
            lora.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    for module in model.modules():
        lora = getattr(module, "lora", None)
        if isinstance(lora, LoRA) and lora.merged:
            module.weight.copy_(lora.original)
            lora.original = None
            lora.merged = False


def remove(model: nn.Module) -> int:
    """Merge every LoRA for good and detach it (hooks and `lora` children): a plain model again; returns layers merged."""
    merge(model)
    count = 0
    for module in model.modules():
        lora = getattr(module, "lora", None)
        if isinstance(lora, LoRA):
            lora.hook.remove()
            del module.lora
            count += 1
    return count


def describe(model: nn.Module, cfg: LoraConfig, adapters: dict[str, LoRA]) -> str:
    targets = ", ".join(chosen_targets(model, cfg.targets))
    return f"LoRA r={cfg.rank} alpha={cfg.alpha:g} dropout={cfg.dropout:g} on {targets} ({len(adapters)} layers)"


def modules(model: nn.Module) -> dict[str, LoRA]:
    """{target module name: its LoRA}."""
    return {name: m.lora for name, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoRA)}


class LoraMethod(Method):
    name = "lora"
    title = "LoRA"
    tags = ("lora",)
    peft_type = "LORA"

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        adapters = apply(model, cfg.lora)
        params = [p for a in adapters.values() for p in a.parameters()]
        return Adapted(self, model, params, describe(model, cfg.lora, adapters))

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(module, part)
                for name, module in modules(adapted.model).items() for part in ("lora_A", "lora_B")}

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        with torch.no_grad():
            for name, module in modules(adapted.model).items():
                for part in ("lora_A", "lora_B"):
                    key = f"{PEFT_PREFIX}{name}.{part}.weight"
                    if key not in tensors:
                        raise UserError(f"{path}: no tensor {key} for this base model's layer {name}")
                    check_shape(path, key, tensors[key].shape, getattr(module, part).shape)
                    getattr(module, part).copy_(tensors[key])
        # An rsLoRA adapter from peft scales by alpha / sqrt(r): the setting is in the folder's adapter config.
        config_path = path.with_name("adapter_config.json")
        if config_path.is_file() and json.loads(read_text(config_path)).get("use_rslora"):
            for module in modules(adapted.model).values():
                module.scale = module.scale * math.sqrt(module.lora_A.shape[0])

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        targets = modules(adapted.model)
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
            "target_modules": chosen_targets(adapted.model, cfg.lora.targets),
            "fan_in_fan_out": any(isinstance(adapted.model.get_submodule(n), Conv1D) for n in targets),
            "bias": "none", "inference_mode": True,
        }

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        targets = adapter_config.get("target_modules")
        if isinstance(targets, str):
            raise UserError(f"{where}: target_modules is the regular expression {targets!r}; peftsum matches a list "
                            f"of module names (suffixes) only; list the modules instead, e.g. [\"q_proj\", \"v_proj\"]")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise UserError(f"{where}: target_modules must be a non-empty list of module names, got {targets!r}")
        unsupported = [k for k in UNSUPPORTED_PEFT_OPTIONS if adapter_config.get(k) not in (None, False, {}, [], "")]
        if adapter_config.get("bias", "none") != "none":
            unsupported.append(f"bias={adapter_config['bias']}")
        if unsupported:
            raise UserError(f"{where}: LoRA options not supported by peftsum: {', '.join(unsupported)} "
                            f"(supported: r, lora_alpha, lora_dropout, target_modules as a list, use_rslora)")
        cfg.lora.rank = number(adapter_config.get("r", 8), int, where, "r")  # peft's defaults where a key is absent
        cfg.lora.alpha = number(adapter_config.get("lora_alpha", 8), float, where, "lora_alpha")
        cfg.lora.dropout = number(adapter_config.get("lora_dropout", 0.0), float, where, "lora_dropout")
        cfg.lora.targets = list(targets)
        # fan_in_fan_out needs no setting: like peft, peftsum transposes for Conv1D layers and not for nn.Linear.

    @contextlib.contextmanager
    def for_generation(self, adapted: Adapted):
        """LoRA merged into the weights while generating: same outputs, no extra matmuls per token."""
        merge(adapted.model)
        try:
            yield
        finally:
            unmerge(adapted.model)

    def merge_for_export(self, adapted: Adapted) -> nn.Module:
        remove(adapted.model)
        return adapted.model


METHOD = LoraMethod()
