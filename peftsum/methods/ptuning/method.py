"""P-tuning: virtual tokens produced by a small trained prompt encoder, placed like the soft prompt.

The encoder is peft's PromptEncoder: N trained input embeddings, then an MLP (three linear layers with ReLU) or a
bidirectional LSTM followed by a two-layer MLP; its output is the N virtual-token embeddings, which go in right before
each row's first real token exactly as a soft prompt does (prompt.py's `insert`, whose docstring explains the
placement). The encoder only trains: what is saved is its output (peft's `prompt_embeddings`, with `inference_mode`),
and a loaded adapter holds those embeddings alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import RunConfig
from ...errors import UserError
from ..base import Adapted, Method, check_decoder_only, check_shape, number
from ..prompt.method import insert
from .config import PtuningConfig

PEFT_KEY = "prompt_embeddings"
PEFT_TYPES = {"mlp": "MLP", "lstm": "LSTM"}  # peft's encoder_reparameterization_type values


class PromptEncoder(nn.Module):
    """peft's PromptEncoder (same parameter names): `embedding` (N x D), then `lstm_head` (if LSTM) and `mlp_head`.
    Built in peft's order, so one seed gives peft's initial weights. `to_inference` keeps only given embeddings."""

    def __init__(self, n: int, dim: int, cfg: PtuningConfig):
        super().__init__()
        hidden = cfg.encoder_hidden_size or dim
        self.kind = cfg.encoder_reparameterization_type
        self.embedding = nn.Embedding(n, dim)
        self.lstm_head = None
        if self.kind == "lstm":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=cfg.encoder_num_layers,
                                     dropout=cfg.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.weight.shape[0]

    def forward(self) -> torch.Tensor:
        """The N virtual-token embeddings (N x D)."""
        x = self.embedding.weight
        if self.mlp_head is None:
            return x
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)

    @torch.no_grad()
    def to_inference(self, embeddings: torch.Tensor) -> None:
        """Hold `embeddings` as the virtual tokens themselves, without the encoder (what a saved adapter holds)."""
        self.lstm_head = self.mlp_head = None
        self.embedding = nn.Embedding.from_pretrained(embeddings.float().to(self.embedding.weight.device),
                                                      freeze=False)


def describe(cfg: PtuningConfig, dim: int) -> str:
    encoder = "MLP"
    if cfg.encoder_reparameterization_type == "lstm":
        encoder = f"{cfg.encoder_num_layers}-layer bidirectional LSTM + MLP"
    hidden = cfg.encoder_hidden_size or dim
    return f"{cfg.num_virtual_tokens} virtual tokens from a prompt encoder ({encoder}, hidden {hidden})"


class PtuningMethod(Method):
    name = "ptuning"
    title = "P-tuning"
    tags = ("p-tuning",)
    peft_type = "P_TUNING"
    can_merge = False
    embeds_virtual_tokens = True
    merge_refusal = ("its virtual tokens are input embeddings placed before every document, not a change of the "
                     "model's weights")

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        model.requires_grad_(False)
        embedding = model.get_input_embeddings().weight
        dim = embedding.shape[1]
        encoder = PromptEncoder(cfg.ptuning.num_virtual_tokens, dim, cfg.ptuning).to(embedding.device)
        return Adapted(self, model, list(encoder.parameters()), describe(cfg.ptuning, dim), prompt_encoder=encoder)

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        encoder = adapted.prompt_encoder
        was_training = encoder.training
        encoder.eval()  # the embeddings without dropout, as they will be used
        try:
            with torch.no_grad():
                return {PEFT_KEY: encoder()}
        finally:
            encoder.train(was_training)

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        if PEFT_KEY not in tensors:
            raise UserError(f"{path}: no tensor {PEFT_KEY} (a p-tuning adapter holds its virtual tokens there)")
        check_shape(path, PEFT_KEY, tensors[PEFT_KEY].shape, adapted.prompt_encoder.embedding.weight.shape)
        adapted.prompt_encoder.to_inference(tensors[PEFT_KEY])
        adapted.trainable = list(adapted.prompt_encoder.parameters())

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        model_config = adapted.model.config
        p = cfg.ptuning
        dim = adapted.prompt_encoder.embedding.weight.shape[1]
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "num_virtual_tokens": p.num_virtual_tokens, "token_dim": dim, "num_transformer_submodules": 1,
            "num_attention_heads": model_config.num_attention_heads, "num_layers": model_config.num_hidden_layers,
            "encoder_reparameterization_type": PEFT_TYPES[p.encoder_reparameterization_type],
            "encoder_hidden_size": p.encoder_hidden_size or dim, "encoder_num_layers": p.encoder_num_layers,
            "encoder_dropout": p.encoder_dropout,
            "inference_mode": True,  # the file holds the encoder's output: peft loads it without the encoder
        }

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        check_decoder_only(adapter_config, where)
        kind = str(adapter_config.get("encoder_reparameterization_type", "MLP")).lower()
        if kind not in PEFT_TYPES:
            raise UserError(f"{where}: encoder_reparameterization_type must be MLP or LSTM, got {kind!r}")
        p = cfg.ptuning
        p.num_virtual_tokens = number(adapter_config.get("num_virtual_tokens"), int, where, "num_virtual_tokens")
        # The file holds the encoder's output; the encoder's settings only say how it was trained (peft's MLP
        # ignores the layer count and dropout, which peftsum's validation refuses: they are not carried over).
        p.encoder_reparameterization_type = kind
        p.encoder_hidden_size = number(adapter_config.get("encoder_hidden_size") or 0, int, where,
                                       "encoder_hidden_size")
        if kind == "lstm":
            p.encoder_num_layers = number(adapter_config.get("encoder_num_layers", 2), int, where, "encoder_num_layers")
            # torch's LSTM drops out between layers only: with one layer the dropout setting does nothing
            dropout = number(adapter_config.get("encoder_dropout", 0.0), float, where, "encoder_dropout")
            p.encoder_dropout = dropout if p.encoder_num_layers > 1 else 0.0

    def virtual_tokens(self, adapted: Adapted) -> int:
        return adapted.prompt_encoder.num_virtual_tokens

    def prepare_inputs(self, adapted: Adapted, embeds: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor | None):
        encoder = adapted.prompt_encoder
        encoder.train(adapted.model.training)  # the encoder lives outside the model: follow its train/eval mode
        return insert(encoder(), embeds, mask, labels)


METHOD = PtuningMethod()
