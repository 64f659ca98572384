"""(IA)^3: learned vectors that rescale the attention keys and values and the feed-forward input, attached with hooks.

Each target module gets an `ia3` child holding one vector `ia3_l`, initialised to ones so that the adapted model
starts as the base. For an attention target a forward hook multiplies the module's output (its bias included) by it;
for a feed-forward target a forward pre-hook multiplies the module's input. The defaults per architecture are peft's
(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING), and so are the vectors'
shapes ((out, 1), or (1, in) on the input side), the file keys (`base_model.model.<module>.ia3_l`) and the
adapter_config.json (`feedforward_modules`), so adapters load both ways. Merging folds the vector into the weight's
rows (and the bias) or columns; unmerging puts the original weight and bias back, bit for bit.

The product runs in fp32 and is rounded once, as in peft: a bf16 copy of a vector near 1 would move in steps of
2^-8, coarser than most of what training changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...config import RunConfig
from ...errors import UserError
from ..base import Adapted, FoldsIntoWeights, check_shape
from ..targets import PEFT_PREFIX, in_out_features, linear_weight, matches, target_names
from .config import Ia3Config

# model_type: (targets, the feed-forward ones among them, scaled on their input), as peft's mappings.
DEFAULT_TARGETS = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    **{t: (["q_proj", "v_proj", "down_proj"], ["down_proj"])
       for t in ("gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
}
PEFT_KEY = "ia3_l"
# peft IA3 options that change what the adapter computes and that peftsum's IA3 does not implement.
UNSUPPORTED_PEFT_OPTIONS = ("modules_to_save", "exclude_modules", "layers_to_transform")


class IA3(nn.Module):
    """One target's scaling vector: (out, 1) on the output, (1, in) on the input of a feed-forward module."""

    def __init__(self, features: int, feedforward: bool):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(1, features) if feedforward else torch.ones(features, 1))
        self.feedforward = feedforward
        self.merged = False
        self.original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # weight and bias while merged
        self.hook = None

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """x times the vector along its last dimension, in fp32, rounded back to x's dtype."""
        return (x * self.ia3_l.flatten()).to(x.dtype)


def _scale_output(module: nn.Module, args, output):
    return output if module.ia3.merged else module.ia3.scaled(output)


def _scale_input(module: nn.Module, args):
    if module.ia3.merged:
        return None
    return (module.ia3.scaled(args[0]), *args[1:])


def chosen_targets(model: nn.Module, cfg: Ia3Config) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets): the user's, else the architecture's default (the default feed-forward
    modules among the user's targets when only those are given)."""
    model_type = getattr(model.config, "model_type", "")
    default = DEFAULT_TARGETS.get(model_type)
    if cfg.targets is None and default is None:
        raise UserError(f"ia3 has no default targets for model type {model_type or 'unknown'!r} (known: "
                        f"{', '.join(DEFAULT_TARGETS)}); give --ia3.targets (attention keys/values and the "
                        f"feed-forward output projection) and --ia3.feedforward")
    targets = cfg.targets or default[0]
    if cfg.feedforward is not None:
        return targets, cfg.feedforward
    return targets, [t for t in default[1] if t in targets] if default else []


def apply(model: nn.Module, cfg: Ia3Config) -> dict[str, IA3]:
    """Freeze the model and attach a scaling vector to each target module; returns {module name: IA3}."""
    model.requires_grad_(False)
    targets, feedforward = chosen_targets(model, cfg)
    vectors = {}
    for name in target_names(model, targets, section="ia3"):
        module = model.get_submodule(name)
        in_features, out_features = in_out_features(module)
        is_ff = matches(name, feedforward)
        ia3 = IA3(in_features if is_ff else out_features, is_ff).to(module.weight.device)
        module.ia3 = ia3
        ia3.hook = (module.register_forward_pre_hook(_scale_input) if is_ff
                    else module.register_forward_hook(_scale_output))
        vectors[name] = ia3
    return vectors


def modules(model: nn.Module) -> dict[str, IA3]:
    """{target module name: its IA3 vector}."""
    return {name: m.ia3 for name, m in model.named_modules() if isinstance(getattr(m, "ia3", None), IA3)}


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every vector into its module: the weight's rows and the bias (output side) or the weight's columns
    (input side). The original weight and bias are kept aside for `unmerge` (dividing again is not exact)."""
    for module in model.modules():
        ia3 = getattr(module, "ia3", None)
        if not isinstance(ia3, IA3) or ia3.merged:
            continue
        bias = module.bias
        ia3.original = (module.weight.detach().clone(), None if bias is None else bias.detach().clone())
        scale = ia3.ia3_l.flatten()
        weight = linear_weight(module)
        merged = (weight * (scale[None, :] if ia3.feedforward else scale[:, None])).to(weight.dtype)
        module.weight.copy_(merged if isinstance(module, nn.Linear) else merged.T)
        if bias is not None and not ia3.feedforward:
            bias.copy_(ia3.scaled(bias))
        ia3.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    for module in model.modules():
        ia3 = getattr(module, "ia3", None)
        if isinstance(ia3, IA3) and ia3.merged:
            weight, bias = ia3.original
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
            ia3.original, ia3.merged = None, False


def remove(model: nn.Module) -> None:
    """Merge every vector for good and detach it (hooks and `ia3` children): a plain model again."""
    merge(model)
    for module in model.modules():
        ia3 = getattr(module, "ia3", None)
        if isinstance(ia3, IA3):
            ia3.hook.remove()
            del module.ia3


def describe(model: nn.Module, cfg: Ia3Config, vectors: dict[str, IA3]) -> str:
    targets, feedforward = chosen_targets(model, cfg)
    inputs = f"; {', '.join(feedforward)} scaled on the input" if feedforward else ""
    return f"IA3 vectors on {', '.join(targets)} ({len(vectors)} layers{inputs})"


def _key(name: str) -> str:
    return f"{PEFT_PREFIX}{name}.{PEFT_KEY}"


def _names(value, where: Path, key: str) -> list[str] | None:
    """A list of module names from an adapter_config.json (None where absent); refuses a regular expression."""
    if value is None:
        return None
    if isinstance(value, str):
        raise UserError(f"{where}: {key} is the regular expression {value!r}; peftsum matches a list of module names "
                        f"(suffixes) only; list the modules instead, e.g. [\"k_proj\", \"v_proj\"]")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise UserError(f"{where}: {key} must be a list of module names, got {value!r}")
    return list(value)


class Ia3Method(FoldsIntoWeights):
    name = "ia3"
    title = "(IA)³"
    tags = ("ia3",)
    peft_type = "IA3"
    attached_keys = (".ia3.",)
    merge, unmerge, remove = staticmethod(merge), staticmethod(unmerge), staticmethod(remove)

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        vectors = apply(model, cfg.ia3)
        return Adapted(self, model, [v.ia3_l for v in vectors.values()], describe(model, cfg.ia3, vectors))

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        return {_key(name): v.ia3_l for name, v in modules(adapted.model).items()}

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        with torch.no_grad():
            for name, vector in modules(adapted.model).items():
                key = _key(name)
                if key not in tensors:
                    raise UserError(f"{path}: no tensor {key} for this base model's layer {name}")
                check_shape(path, key, tensors[key].shape, vector.ia3_l.shape)
                vector.ia3_l.copy_(tensors[key])

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        targets, feedforward = chosen_targets(adapted.model, cfg.ia3)
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": any(isinstance(adapted.model.get_submodule(n), Conv1D) for n in modules(adapted.model)),
            "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True,
        }

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        unsupported = [k for k in UNSUPPORTED_PEFT_OPTIONS if adapter_config.get(k) not in (None, False, {}, [], "")]
        if unsupported:
            raise UserError(f"{where}: IA3 options not supported by peftsum: {', '.join(unsupported)} "
                            f"(supported: target_modules and feedforward_modules as lists)")
        targets = _names(adapter_config.get("target_modules"), where, "target_modules")
        if not targets:
            raise UserError(f"{where}: target_modules must be a non-empty list of module names, got {targets!r}")
        cfg.ia3.targets = targets
        # peft fills feedforward_modules from its mapping when it creates the adapter; None: the architecture's.
        cfg.ia3.feedforward = _names(adapter_config.get("feedforward_modules"), where, "feedforward_modules")
        # fan_in_fan_out needs no setting: like peft, peftsum transposes for Conv1D layers and not for nn.Linear.


METHOD = Ia3Method()
