"""LoRA and its variants: a low-rank update W + scale * B @ A beside chosen linear layers, attached with forward hooks.

The base model's code and parameter names stay untouched: each target module gets a `lora` child holding A and B,
and a forward hook adds the update to its output. Merging folds the update into the weight (zero overhead for
generation); unmerging puts the original weight back. GPT-2's Conv1D stores its weight as (in, out), which matters
only where the weight itself is read (merging, DoRA's norm, PiSSA/OLoRA).

The options, each as peft computes it (tests/test_lora_variants.py holds the parity checks):
- `lora.variant`: `lora` scales by alpha / r; `rslora` by alpha / sqrt(r); `dora` (weight-decomposed) makes the
  layer W' = m * (W + scale * B A) / ||W + scale * B A|| with a trained magnitude m per output row, initialised to
  the rows' norms, and the norm treated as a constant (no gradient), as the DoRA paper (section 4.3) and peft do.
- `lora.init`: `pissa` takes A, B from the top-r singular triplets of W (`pissa_niter_N`: a randomized SVD),
  `olora` from its QR decomposition; B A * scale is subtracted from the frozen weight, so the model starts unchanged.
  The saved adapter is the plain rank-2r LoRA [A | A0], [B | -B0] that applies to the ORIGINAL weights: peft's
  `save_pretrained(path_initial_model_for_weight_conversion=...)`, so it loads on the untouched base anywhere.
- `lora.lr_ratio` (LoRA+): B (and DoRA's magnitudes, which peft's LoRA+ groups with B) learn at ratio x lr.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...config import RunConfig
from ...errors import UserError
from ..base import Adapted, FoldsIntoWeights, check_shape, number
from ..targets import PEFT_PREFIX, in_out_features, linear_weight, target_names
from .config import LoraConfig

# PEFT's matching rule: a target names a module exactly or as a dotted suffix of its full name.
DEFAULT_TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],  # Gemma 3's text-only model (Gemma3ForCausalLM)
}
FALLBACK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value", "out_proj"]
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude in a peft file: base_model.model.<module>.lora_magnitude_vector
# peft LoRA options that change what the adapter computes and that peftsum's LoRA does not implement.
UNSUPPORTED_PEFT_OPTIONS = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                            "lora_bias", "exclude_modules", "layer_replication", "target_parameters",
                            "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                            "kasa_config", "velora_config", "monteclora_config")
# peft initialisations that change the base weights: such an adapter applies to the residual model peft made.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}


class LoRA(nn.Module):
    """The trainable pair (A: r x in, B: out x r), DoRA's magnitude where it has one, and the initial A, B of a
    PiSSA/OLoRA start (what saving subtracts). B starts at zero by default, so the adapted model starts as the base."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 rslora: bool = False):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.register_parameter("magnitude", None)  # DoRA: set by `decompose`
        self.register_buffer("initial_A", None, persistent=False)  # PiSSA/OLoRA: set by `init_from_weight`
        self.register_buffer("initial_B", None, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.merged = False
        self.original: torch.Tensor | None = None  # the base weight while merged
        self.hook = None  # handle of the forward hook that adds the update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the activations' dtype: bf16 activations meet fp32 trainable weights when the frozen model is bf16.
        return F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def plain_low_rank(self) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """(A, scale * B, dropout) where this adapter adds only x A^T (scale B)^T to its layer's output, x through its
        dropout first if `dropout` (one mask per layer): what a caller computing the layer's product itself must add
        (fast/fused.py). None where it adds something else (DoRA rescales the output too) or nothing (merged)."""
        if self.merged or self.magnitude is not None:
            return None
        return self.lora_A, self.lora_B * self.scale, not isinstance(self.dropout, nn.Identity)

    def delta(self) -> torch.Tensor:
        """The weight update in nn.Linear layout (out x in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ||W + scale * B A|| per output row (weight in nn.Linear layout), a constant to the gradient.

        In fp32 whatever the weights' dtype: a bf16 norm (peft's, under bf16) is off by up to 0.4%, which would
        scale each row of a freshly initialised model by that much."""
        return (weight.float() + self.delta()).norm(dim=1)

    @torch.no_grad()
    def decompose(self, weight: torch.Tensor) -> None:
        """DoRA: the magnitude starts as the rows' norms, so the adapted layer starts as the base layer."""
        self.magnitude = nn.Parameter(self.weight_norm(weight))

    def dora_update(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base layer's `output`: (m / ||W + sBA|| - 1) W x + m / ||W + sBA|| * s B A x.

        Without dropout (or in eval mode) W x is the output less its bias; with dropout, like peft, it is recomputed
        on the dropped-out input, so the magnitude scales the same input the low-rank update sees."""
        weight = linear_weight(module)
        factor = (self.magnitude / self.weight_norm(weight)).to(x.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = output if module.bias is None else output - module.bias
        else:
            x = self.dropout(x)
            base = F.linear(x, weight.to(x.dtype))
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale
        return (factor - 1) * base + factor * update

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight (nn.Linear layout) with the update folded in, in its own dtype."""
        if self.magnitude is None:
            return weight + self.delta().to(weight.dtype)
        combined = weight.float() + self.delta()
        return (combined * (self.magnitude / combined.norm(dim=1))[:, None]).to(weight.dtype)

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as saved: after PiSSA/OLoRA, [A | A0] and [B | -B0], the rank-2r LoRA B A - B0 A0 that applies to
        the original weights (peft's conversion); otherwise A and B themselves."""
        if self.initial_A is None:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.initial_A], dim=0), torch.cat([self.lora_B, -self.initial_B], dim=1)


def _add_update(module: nn.Module, args, output):
    lora = module.lora
    if lora.merged:
        return output
    if lora.magnitude is None:
        return output + lora(args[0])
    return output + lora.dora_update(module, args[0], output)


@torch.no_grad()
def init_from_weight(module: nn.Module, lora: LoRA, how: str) -> None:
    """PiSSA (`pissa`, `pissa_niter_N`) or OLoRA (`olora`): A, B from the weight, and scale * B A taken out of it.

    As peft's pissa_init / olora_init, in fp32, except that OLoRA decomposes the weight in nn.Linear layout for
    Conv1D too (peft's decomposes Conv1D's transposed storage, which fails on GPT-2's c_attn and is wrong elsewhere).
    """
    weight = linear_weight(module).float()
    rank = lora.lora_A.shape[0]
    if rank > min(weight.shape):
        raise UserError(f"lora.rank {rank} exceeds what lora.init {how} can take from a {tuple(weight.shape)} weight "
                        f"(at most {min(weight.shape)})")
    if how == "olora":
        q, r = torch.linalg.qr(weight)
        b, a = q[:, :rank].contiguous(), r[:rank].contiguous()
    else:
        if how == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        else:  # pissa_niter_N: torch's randomized SVD with N subspace iterations (seeded by the torch generator)
            u, s, v = torch.svd_lowrank(weight, q=rank, niter=int(how.rsplit("_", 1)[1]))
            vh = v.t()
        root = torch.diag(torch.sqrt(s / lora.scale))
        a, b = root @ vh, u @ root
    lora.lora_A.copy_(a)
    lora.lora_B.copy_(b)
    lora.initial_A, lora.initial_B = a.clone(), b.clone()
    residual = (weight - lora.scale * b @ a).to(module.weight.dtype)  # peft's order of operations
    module.weight.copy_(residual if isinstance(module, nn.Linear) else residual.T)


def chosen_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The user's target patterns, or the architecture's default."""
    return targets or DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), FALLBACK_TARGETS)


def apply(model: nn.Module, cfg: LoraConfig) -> dict[str, LoRA]:
    """Freeze the model and attach LoRA to the target modules; returns {module name: LoRA}."""
    model.requires_grad_(False)
    adapters = {}
    for name in target_names(model, chosen_targets(model, cfg.targets), section="lora"):
        module = model.get_submodule(name)
        in_features, out_features = in_out_features(module)
        lora = LoRA(in_features, out_features, cfg.rank, cfg.alpha, cfg.dropout,
                    rslora=cfg.variant == "rslora").to(module.weight.device)
        if cfg.init != "default":
            init_from_weight(module, lora, cfg.init)
        if cfg.variant == "dora":
            lora.decompose(linear_weight(module))
        module.lora = lora
        lora.hook = module.register_forward_hook(_add_update)
        adapters[name] = lora
    return adapters


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (the hook then adds nothing).

    The original weight is kept aside and restored by `unmerge`: subtracting the update again would not give the
    same bits back in bf16 (and DoRA's rescaling cannot be undone exactly at all), and each evaluation would drift
    the base model a little.
    """
    for module in model.modules():
        lora = getattr(module, "lora", None)
        if isinstance(lora, LoRA) and not lora.merged:
            lora.original = module.weight.detach().clone()
            merged = lora.merged_weight(linear_weight(module))
            module.weight.copy_(merged if isinstance(module, nn.Linear) else merged.T)
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
    """Merge every LoRA for good and detach it (hooks and `lora` children): a plain model again; returns layers
    merged."""
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
    init = "" if cfg.init == "default" else f", {cfg.init} init"
    plus = f", LoRA+ B lr x{cfg.lr_ratio:g}" if cfg.lr_ratio != 1 else ""
    return (f"{NAMES[cfg.variant]} r={cfg.rank} alpha={cfg.alpha:g} dropout={cfg.dropout:g}{init}{plus} on {targets} "
            f"({len(adapters)} layers)")


def modules(model: nn.Module) -> dict[str, LoRA]:
    """{target module name: its LoRA}."""
    return {name: m.lora for name, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoRA)}


def _key(name: str, part: str) -> str:
    return f"{PEFT_PREFIX}{name}.{part}" if part == MAGNITUDE else f"{PEFT_PREFIX}{name}.{part}.weight"


class LoraMethod(FoldsIntoWeights):
    name = "lora"
    title = "LoRA"
    tags = ("lora",)
    peft_type = "LORA"
    attached_keys = (".lora.",)
    merge, unmerge, remove = staticmethod(merge), staticmethod(unmerge), staticmethod(remove)

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        adapters = apply(model, cfg.lora)
        params = [p for a in adapters.values() for p in a.parameters()]
        return Adapted(self, model, params, describe(model, cfg.lora, adapters))

    def saved_as(self, cfg: RunConfig) -> RunConfig:
        """A PiSSA/OLoRA run is saved as the plain LoRA of rank 2r that applies to the original weights (peft's
        conversion: alpha doubles too, or grows by sqrt(2) under rsLoRA, so that the scale stays the same)."""
        if cfg.lora.init == "default":
            return cfg
        saved = copy.deepcopy(cfg)
        saved.lora.rank = 2 * cfg.lora.rank
        saved.lora.alpha = cfg.lora.alpha * (math.sqrt(2) if cfg.lora.variant == "rslora" else 2)
        saved.lora.init = "default"
        return saved

    def param_groups(self, adapted: Adapted, lr: float) -> list[dict]:
        """LoRA+: the B matrices, and the 1-d DoRA magnitudes as peft's create_loraplus_optimizer groups them,
        at lr_ratio x lr; the A matrices at lr."""
        ratio = adapted.settings.lr_ratio
        if ratio == 1:
            return super().param_groups(adapted, lr)
        fast = {id(p) for m in modules(adapted.model).values() for p in (m.lora_B, m.magnitude) if p is not None}
        return [{"params": [p for p in adapted.trainable if id(p) not in fast], "lr": lr},
                {"params": [p for p in adapted.trainable if id(p) in fast], "lr": lr * ratio}]

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in modules(adapted.model).items():
            out[_key(name, "lora_A")], out[_key(name, "lora_B")] = module.saved()
            if module.magnitude is not None:
                out[_key(name, MAGNITUDE)] = module.magnitude
        return out

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        with torch.no_grad():
            for name, module in modules(adapted.model).items():
                parts = ("lora_A", "lora_B") + (("magnitude",) if module.magnitude is not None else ())
                for part in parts:
                    key = _key(name, MAGNITUDE if part == "magnitude" else part)
                    if key not in tensors:
                        raise UserError(f"{path}: no tensor {key} for this base model's layer {name}")
                    check_shape(path, key, tensors[key].shape, getattr(module, part).shape)
                    getattr(module, part).copy_(tensors[key])

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        targets = modules(adapted.model)
        saved = self.saved_as(cfg).lora
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": saved.rank, "lora_alpha": saved.alpha, "lora_dropout": saved.dropout,
            "target_modules": chosen_targets(adapted.model, saved.targets),
            "fan_in_fan_out": any(isinstance(adapted.model.get_submodule(n), Conv1D) for n in targets),
            "use_dora": saved.variant == "dora", "use_rslora": saved.variant == "rslora",
            "init_lora_weights": True,  # what the weights are saved as applies to the untouched base model
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
        dora, rslora = bool(adapter_config.get("use_dora")), bool(adapter_config.get("use_rslora"))
        if dora and rslora:
            unsupported.append("use_dora with use_rslora")
        if unsupported:
            raise UserError(f"{where}: LoRA options not supported by peftsum: {', '.join(unsupported)} "
                            f"(supported: r, lora_alpha, lora_dropout, target_modules as a list, use_dora or "
                            f"use_rslora)")
        init = adapter_config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            raise UserError(f"{where}: init_lora_weights {init!r}: this adapter applies to the residual base model "
                            f"peft made when it initialised it; save it with peft's save_pretrained("
                            f"path_initial_model_for_weight_conversion=...) to get the plain LoRA that applies to "
                            f"the original model, and load that")
        cfg.lora.rank = number(adapter_config.get("r", 8), int, where, "r")  # peft's defaults where a key is absent
        cfg.lora.alpha = number(adapter_config.get("lora_alpha", 8), float, where, "lora_alpha")
        cfg.lora.dropout = number(adapter_config.get("lora_dropout", 0.0), float, where, "lora_dropout")
        cfg.lora.targets = list(targets)
        cfg.lora.variant = "dora" if dora else "rslora" if rslora else "lora"
        cfg.lora.init = "default"  # the saved A and B replace whatever the initialisation drew
        # fan_in_fan_out needs no setting: like peft, peftsum transposes for Conv1D layers and not for nn.Linear.


METHOD = LoraMethod()
