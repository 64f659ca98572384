"""Prefix tuning: N trained key/value positions in every layer, attended to by every token before its own context.

The prefix is what peft's PrefixEncoder holds: per virtual token, the keys and values of every layer, flat
(N x layers * 2 * kv heads * head dim, in that order). With `prefix.projection` it is trained through peft's
reparameterisation MLP (N embeddings -> Linear -> tanh -> Linear); what is saved is always the plain prefix (peft's
`prompt_embeddings`, with `inference_mode`, so peft loads it without the MLP) and what generates is that prefix.

The model sees the prefix through its key/value cache: each layer's cache holds the prefix before the batch arrives,
and the attention mask gains N ones in front. Placement follows peft's unpadded behaviour, which is the reference:
there a row's real tokens take positions N, N+1, ... after the prefix. Cached keys carry no position of their own
(the prefix's keys are used as trained, never rotated), so where the prefix sits in the cache does not matter, only
the positions of the real tokens and the mask do. In a left-padded batch the prefix therefore stays at the front of
the cache, before the padding, the padding is masked out, and positions are counted from N at each row's first
real token, so every row computes what it computes alone (tests/test_prefix_ptuning.py measures the difference). The
data leaves room for those N positions (`virtual_tokens`), as for a soft prompt. Generation prefills each prompt
into a cache that already holds the prefix, so rows leaving the batch take their prefix with them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...config import RunConfig
from ...errors import UserError
from ..base import Adapted, Method, check_decoder_only, check_shape, number
from .config import PrefixConfig

PEFT_KEY = "prompt_embeddings"  # the flat prefix's name in a peft prefix-tuning adapter


def kv_layout(model_config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) as peft counts them for its prefix (grouped-query attention: the kv heads)."""
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return layers, getattr(model_config, "num_key_value_heads", None) or heads, head_dim


class PrefixEncoder(nn.Module):
    """peft's PrefixEncoder: `embedding` (N x flat width) is the prefix itself, or, with the projection, N small
    embeddings that `transform` maps to it. `to_inference` drops the MLP and keeps the prefix it computes."""

    def __init__(self, n: int, layers: int, heads: int, head_dim: int, projection: bool, hidden: int):
        super().__init__()
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        width = heads * head_dim
        if projection:  # built in peft's order, so one seed gives peft's initial weights
            self.embedding = nn.Embedding(n, width)
            self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * width))
        else:
            self.embedding = nn.Embedding(n, layers * 2 * width)
            self.transform = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.weight.shape[0]

    def forward(self) -> torch.Tensor:
        """The flat prefix (N x layers * 2 * kv width)."""
        flat = self.embedding.weight
        return flat if self.transform is None else self.transform(flat)

    def key_values(self, rows: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (rows, kv heads, N, head dim): peft's view and permutation of the flat
        prefix (layer l's keys are slot 2l of the layers x 2 axis, its values slot 2l + 1)."""
        n = self.num_virtual_tokens
        kv = self().to(dtype).view(n, self.layers * 2, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i].expand(rows, -1, -1, -1), kv[2 * i + 1].expand(rows, -1, -1, -1))
                for i in range(self.layers)]

    @torch.no_grad()
    def to_inference(self, flat: torch.Tensor) -> None:
        """Hold `flat` as the prefix itself, without the MLP (what a saved adapter holds)."""
        self.transform = None
        self.embedding = nn.Embedding.from_pretrained(flat.float().to(self.embedding.weight.device), freeze=False)


@torch.no_grad()
def text_prefix(model: nn.Module, tokenizer, cfg: PrefixConfig) -> torch.Tensor:
    """The flat prefix the model itself computes for the init text (repeated to length N): the keys and values of
    real words, from which prefix tuning learns more steadily than from noise (Li & Liang, 2021)."""
    n = cfg.num_virtual_tokens
    ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    ids = torch.tensor((ids * (n // len(ids) + 1))[:n], device=model.get_input_embeddings().weight.device)
    cache = DynamicCache(config=model.config)
    was_training = model.training
    model.eval()  # no dropout in the keys and values
    try:
        model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    finally:
        model.train(was_training)
    stacked = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # L, 2, H, N, D
    return stacked.permute(3, 0, 1, 2, 4).reshape(n, -1).float()


@torch.no_grad()
def start_at(encoder: PrefixEncoder, flat: torch.Tensor) -> None:
    """Make the encoder compute `flat` at the start. Without the projection that is the prefix itself; with it, the
    MLP's last layer is solved by least squares on its hidden features (exact when its width is at least N)."""
    if encoder.transform is None:
        encoder.embedding.weight.copy_(flat)
        return
    hidden = encoder.transform[1](encoder.transform[0](encoder.embedding.weight))  # N x hidden
    features = torch.cat([hidden, hidden.new_ones(len(hidden), 1)], dim=1)
    solution = torch.linalg.pinv(features) @ flat  # (hidden + 1) x flat width
    last = encoder.transform[2]
    last.weight.copy_(solution[:-1].T)
    last.bias.copy_(solution[-1])


def apply(model: nn.Module, tokenizer, cfg: PrefixConfig) -> PrefixEncoder:
    """Freeze the model and return the trainable prefix (initialised from the global RNG, as peft's)."""
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        # A sliding-window layer keeps only its last window of keys: the prefix would slide out of it.
        raise UserError(f"prefix tuning does not support {model.config.model_type} models yet: they have "
                        "sliding-window attention layers, whose cache would drop the prefix; use prompt or ptuning")
    model.requires_grad_(False)
    layers, heads, head_dim = kv_layout(model.config)
    hidden = cfg.encoder_hidden_size or heads * head_dim
    device = model.get_input_embeddings().weight.device
    encoder = PrefixEncoder(cfg.num_virtual_tokens, layers, heads, head_dim, cfg.projection, hidden).to(device)
    if cfg.init == "text":
        start_at(encoder, text_prefix(model, tokenizer, cfg))
    return encoder


def describe(cfg: PrefixConfig, encoder: PrefixEncoder) -> str:
    init = f"text {cfg.init_text!r}" if cfg.init == "text" else "random"
    how = (f", trained through an MLP (hidden {encoder.transform[0].out_features})"
           if encoder.transform is not None else "")
    return (f"{cfg.num_virtual_tokens}-position key/value prefix in {encoder.layers} layers{how}, "
            f"initialised from {init}")


class PrefixMethod(Method):
    name = "prefix"
    title = "prefix tuning"
    tags = ("prefix-tuning",)
    peft_type = "PREFIX_TUNING"
    can_merge = False
    cached_prefix = True
    merge_refusal = ("its prefix is keys and values every layer attends to before the document, not a change of "
                     "the model's weights")

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        encoder = apply(model, tokenizer, cfg.prefix)
        return Adapted(self, model, list(encoder.parameters()), describe(cfg.prefix, encoder), prompt_encoder=encoder)

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {PEFT_KEY: adapted.prompt_encoder()}

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        if PEFT_KEY not in tensors:
            raise UserError(f"{path}: no tensor {PEFT_KEY} (a prefix-tuning adapter holds its prefix there)")
        encoder = adapted.prompt_encoder
        want = (encoder.num_virtual_tokens, encoder.layers * 2 * encoder.heads * encoder.head_dim)
        check_shape(path, PEFT_KEY, tensors[PEFT_KEY].shape, torch.Size(want))
        encoder.to_inference(tensors[PEFT_KEY])
        adapted.trainable = list(encoder.parameters())

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        encoder = adapted.prompt_encoder
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "num_virtual_tokens": encoder.num_virtual_tokens, "token_dim": encoder.heads * encoder.head_dim,
            "num_transformer_submodules": 1, "num_attention_heads": encoder.heads, "num_layers": encoder.layers,
            "encoder_hidden_size": cfg.prefix.encoder_hidden_size or encoder.heads * encoder.head_dim,
            "prefix_projection": cfg.prefix.projection, "init_weights": None,
            "inference_mode": True,  # the file holds the prefix itself: peft loads it without the MLP
        }

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        check_decoder_only(adapter_config, where)
        cfg.prefix.num_virtual_tokens = number(adapter_config.get("num_virtual_tokens"), int, where,
                                               "num_virtual_tokens")
        # peft saves the plain prefix whether or not it trained through the MLP; its settings say how it trained.
        cfg.prefix.projection = bool(adapter_config.get("prefix_projection", False))
        cfg.prefix.encoder_hidden_size = number(adapter_config.get("encoder_hidden_size") or 0, int, where,
                                                "encoder_hidden_size")
        cfg.prefix.init = "random"  # the saved prefix replaces it; avoids tokenizing an init text

    def virtual_tokens(self, adapted: Adapted) -> int:
        return adapted.prompt_encoder.num_virtual_tokens

    def prepare_inputs(self, adapted: Adapted, embeds: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor | None):
        prefix = mask.new_ones((mask.shape[0], adapted.prompt_encoder.num_virtual_tokens))
        return embeds, torch.cat([prefix, mask], dim=1), labels

    def key_value_prefix(self, adapted: Adapted, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return adapted.prompt_encoder.key_values(rows, adapted.frozen_dtype)


METHOD = PrefixMethod()
