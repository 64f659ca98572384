"""The protocol every method follows (`Method`, `Adapted`), the helpers methods share, and `adapt(model, tokenizer,
name, cfg)`.

A method object says how it attaches to a model, which tensors it trains and saves (under peft's names where peft
has the method), how it reads and writes a peft `adapter_config.json`, what it adds to the model's inputs (embeddings
placed among the tokens, or keys and values every layer attends to before them), and how it folds into the weights
for generation and export, or why it cannot. Training, evaluation, adapter files and the command line only talk to
that object (found by name in registry.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..core.models import compute_dtype, count_parameters
from ..errors import UserError
from .registry import method_named

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name, used by every method that has a peft form


class Method:
    """What the rest of peftsum needs from a method. The defaults fit a method that changes weights of the model
    in place and has no peft form; each method module overrides what differs."""

    name: str
    title: str = ""  # what people call it, for model cards ("LoRA")
    tags: tuple[str, ...] = ()  # Hugging Face hub tags of a trained result
    peft_type: str | None = None  # adapter_config.json's peft_type; None: no peft form
    weights_file: str = ADAPTER_WEIGHTS  # the safetensors file `adapters.save` writes into a method folder
    can_merge: bool = True  # whether `merge_for_export` gives a plain transformers model
    merge_refusal: str = ""  # why not, where it cannot
    encoder_prefix: str = "prompt_encoder."  # checkpoint names of `Adapted.prompt_encoder`'s parameters
    cached_prefix: bool = False  # whether `key_value_prefix` gives keys and values (every forward then has a cache)
    # Whether it places trained virtual tokens among the input embeddings (`prepare_inputs`): what peft puts before a
    # left-padded row's padding, which a model card warns of.
    embeds_virtual_tokens: bool = False
    # Parts of the state-dict keys of the modules the method attaches to the model (LoRA's ".lora."): none may be left
    # in the model `merge_for_export` gives. Such a module hooks its layer and says whether it is folded into the
    # layer's weight (`merged`), its hook then passing the output through.
    attached_keys: tuple[str, ...] = ()

    def shards_with_fsdp(self, settings) -> bool:
        """Whether training with these settings (the method's config section) is what FSDP shards: all weights."""
        return False

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        """Prepare `model` (in place) for training: freeze what stays, attach what trains."""
        raise NotImplementedError

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        """The trained tensors by the names they have in the weights file."""
        raise NotImplementedError

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Copy `tensors` (read from `path`) into a freshly applied model; refuse names or shapes that do not fit."""
        raise NotImplementedError

    def saved_as(self, cfg: RunConfig) -> RunConfig:
        """The settings whose freshly applied model the saved weights load into: `cfg` itself, unless the method
        saves another form than it trains (LoRA from PiSSA/OLoRA is saved as the plain LoRA it amounts to)."""
        return cfg

    def param_groups(self, adapted: Adapted, lr: float) -> list[dict]:
        """The optimizer's parameter groups (AdamW's `params` argument): one group at `lr` unless the method wants
        several (LoRA+ trains its B matrices faster)."""
        return [{"params": adapted.trainable}]

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict | None:
        """peft's adapter_config.json for the trained result, or None where the method has no peft form."""
        return None

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        """Set this method's settings in `cfg` from a peft adapter_config.json (read from `where`)."""
        raise UserError(f"{where}: peftsum cannot load {self.name} adapters from peft")

    def virtual_tokens(self, adapted: Adapted) -> int:
        """Input positions the method adds before the real tokens (the data leaves room for them)."""
        return 0

    def prepare_inputs(self, adapted: Adapted, embeds: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor | None):
        """(embeds, mask, labels) as the model should see them: the method's own inputs placed in. Where the method
        has a `key_value_prefix`, the mask covers it too, in front: (B, prefix + L) for embeds of length L."""
        return embeds, mask, labels

    def key_value_prefix(self, adapted: Adapted, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values every layer attends to before the inputs, per layer (rows, kv heads, length, head dim) in
        the frozen weights' dtype, already in the key/value cache when the inputs arrive; None: the method has none."""
        return None

    @contextlib.contextmanager
    def for_generation(self, adapted: Adapted):
        """A context in which the adapted model generates as fast as it can (e.g. LoRA merged into the weights)."""
        yield

    def merge_for_export(self, adapted: Adapted) -> nn.Module:
        """The adapted model as a plain transformers model (for export); raises UserError where it cannot be."""
        if not self.can_merge:
            raise UserError(f"a {self.title} result cannot be exported as a plain model: {self.merge_refusal}")
        return adapted.model


class FoldsIntoWeights(Method):
    """A method whose update folds into the weights it adapts (LoRA, IA3): folded in while generating (the same
    outputs, no extra work per token) and for good on export. Its module gives the three operations over a model."""

    merge: Callable[[nn.Module], object]  # fold every attached update into its weight (hooks then pass through)
    unmerge: Callable[[nn.Module], object]  # take them out again: training continues as before
    remove: Callable[[nn.Module], object]  # fold them in for good and detach the method's modules and hooks

    @contextlib.contextmanager
    def for_generation(self, adapted: Adapted):
        self.merge(adapted.model)
        try:
            yield
        finally:
            self.unmerge(adapted.model)

    def merge_for_export(self, adapted: Adapted) -> nn.Module:
        self.remove(adapted.model)
        return adapted.model


@dataclass
class Adapted:
    """A model prepared for one method: which parameters train, and the method's own module if it has one."""

    method: Method
    model: nn.Module
    trainable: list[nn.Parameter]
    description: str
    prompt_encoder: nn.Module | None = None  # trainable inputs outside the model (peft's name): the soft prompt
    frozen_dtype: torch.dtype = torch.float32  # how the frozen weights are stored; the activations follow it
    settings: object = None  # the method's config section it was applied with (e.g. LoraConfig)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def virtual_tokens(self) -> int:
        return self.method.virtual_tokens(self)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by a stable name (what checkpoints store): the model's parameter name, or the
        method's prefix + the name inside its prompt encoder."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        if self.prompt_encoder is not None:
            names.update({id(p): self.method.encoder_prefix + n for n, p in self.prompt_encoder.named_parameters()})
        return {names[id(p)]: p for p in self.trainable}

    def parameter_counts(self) -> dict:
        extra = list(self.prompt_encoder.parameters()) if self.prompt_encoder is not None else []
        total, trainable = count_parameters(self.model, extra)
        return {"total": total, "trainable": trainable, "trainable_percent": 100.0 * trainable / total,
                "description": self.description}

    def for_generation(self):
        return self.method.for_generation(self)


def check_shape(path: Path, key: str, got: torch.Size, want: torch.Size) -> None:
    """Refuse a saved tensor whose shape does not fit this base model."""
    if tuple(got) != tuple(want):
        raise UserError(f"{path}: {key} has shape {tuple(got)}, but this base model needs {tuple(want)} "
                        f"(was the adapter trained on another model?)")


def number(value, kind, where: Path, key: str):
    """A number from an adapter_config.json, as `kind` (int or float), or a one-line refusal naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise UserError(f"{where}: {key} must be a number{' (whole)' if kind is int else ''}, got {value!r}")
    return kind(value)


def check_decoder_only(adapter_config: dict, where: Path) -> None:
    """Refuse a virtual-token adapter (prompt, prefix, P-tuning) made for an encoder-decoder model."""
    submodules = adapter_config.get("num_transformer_submodules", 1)
    if submodules not in (None, 1):
        raise UserError(f"{where}: num_transformer_submodules {submodules!r} is for encoder-decoder models; "
                        f"peftsum supports 1 (causal LMs)")


def unhooked(module: nn.Module) -> bool:
    """Whether the module computes what its own forward does, no hook changing it: it has none, or only those of
    merged method modules attached to it (a merged LoRA or IA3 passes the output through: its update is in the
    weight)."""
    hooks = len(module._forward_hooks) + len(module._forward_pre_hooks)
    attached = [child for child in module.children() if hasattr(child, "merged")]
    return hooks == 0 or (hooks == len(attached) and all(child.merged for child in attached))


class Untouched(Method):
    """The base model as it is: the 'before training' reference every method is measured against."""

    name = "base"

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        model.requires_grad_(False)
        return Adapted(self, model, [], "untouched base model")

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        return {}


UNTOUCHED = Untouched()


def adapt(model: nn.Module, tokenizer, name: str, cfg: RunConfig) -> Adapted:
    """Prepare `model` (modified in place) for training with the method called `name`.

    Frozen weights are then stored in the compute precision (bf16 where the hardware has it): autocast would
    otherwise re-cast every frozen matrix at every step, and bf16 activations halve the memory traffic of the
    element-wise work that dominates small models on a CPU. Trainable parameters stay fp32, as does their optimizer state.
    """
    adapted = method_named(name).apply(model, tokenizer, cfg)
    adapted.settings = getattr(cfg, name)
    device = next(model.parameters()).device
    adapted.frozen_dtype = store_frozen_in(model, compute_dtype(cfg.model.precision, device))
    embedding = model.get_input_embeddings()
    if embedding.weight.requires_grad and embedding.weight.dtype != adapted.frozen_dtype:
        # A trainable (fp32) embedding feeds frozen bf16 blocks, also for the tokens generate() embeds itself:
        # its output takes the frozen weights' dtype, since some CPU kernels (layer_norm) refuse mixed inputs.
        embedding.register_forward_hook(lambda module, args, output: output.to(adapted.frozen_dtype))
    return adapted


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """Cast the frozen floating-point parameters to `dtype`; returns the dtype the frozen weights now have."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for param in frozen:
        param.data = param.data.to(dtype)
    return dtype if frozen else torch.float32


def untouched(model: nn.Module, dtype: torch.dtype = torch.float32) -> Adapted:
    """The base model as it is (stored in `dtype`, in place): the 'before training' reference for every method."""
    adapted = UNTOUCHED.apply(model, None, RunConfig())
    adapted.frozen_dtype = store_frozen_in(model, dtype)
    return adapted
