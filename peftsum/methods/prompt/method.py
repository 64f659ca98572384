"""Soft prompt tuning: N trainable virtual-token embeddings placed directly before each example's real tokens.

Placement is the whole trick. In a left-padded batch the virtual tokens go *after* the padding, immediately before
the first real token, and positions are counted from the first virtual token, exactly as in training (where a
sequence starts with its virtual tokens at position 0). Putting them before the padding instead, as HF `peft` does,
separates prompt and text by pad slots at generation time and gives the collapsed summaries seen in the reference
study. Generation receives the prompt through `inputs_embeds`, so it sits in the KV cache for every new token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ...config import RunConfig
from ...errors import UserError
from ..base import Adapted, Method, check_decoder_only, check_shape, number
from .config import PromptConfig

PEFT_KEY = "prompt_embeddings"  # the tensor's name in a peft prompt-tuning adapter


class SoftPrompt(nn.Module):
    """The virtual-token embeddings (num_virtual_tokens x hidden size), trained in fp32."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def insert(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """The virtual tokens inserted before each row's first real token (see `insert`)."""
        return insert(self.embeddings, embeds, attention_mask, labels)


def insert(virtual_tokens: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor | None = None):
    """Insert `virtual_tokens` (N, D) before each row's first real token.

    embeds (B, L, D), attention_mask (B, L) with padding on either side -> (B, L+N, D), mask (B, L+N), and labels
    (B, L+N) with -100 at the virtual positions when labels are given.
    """
    batch, length = attention_mask.shape
    n = virtual_tokens.shape[0]
    device = embeds.device
    first_real = attention_mask.int().argmax(dim=1)  # index of the first 1 (0 for right padding)
    j = torch.arange(length + n, device=device).expand(batch, -1)
    start = first_real[:, None]
    is_virtual = (j >= start) & (j < start + n)
    # Source index into the original sequence for non-virtual slots: before the prompt j, after it j - n.
    source = torch.where(j < start, j, j - n).clamp(0, length - 1)
    gathered = torch.gather(embeds, 1, source[..., None].expand(-1, -1, embeds.shape[-1]))
    virtual = virtual_tokens.to(embeds.dtype)[(j - start).clamp(0, n - 1)]
    new_embeds = torch.where(is_virtual[..., None], virtual, gathered)
    new_mask = torch.where(is_virtual, torch.ones_like(j), torch.gather(attention_mask, 1, source))
    new_mask = new_mask.to(attention_mask.dtype)
    if labels is None:
        return new_embeds, new_mask, None
    new_labels = torch.where(is_virtual, torch.full_like(j, -100), torch.gather(labels, 1, source))
    return new_embeds, new_mask, new_labels


def initial_embeddings(model: nn.Module, tokenizer, cfg: PromptConfig, generator: torch.Generator) -> torch.Tensor:
    """Start from a task text's token embeddings (repeated to length), sampled vocabulary rows, or random noise
    at the scale of the real embeddings (unit-variance noise, PEFT's RANDOM, is ~30x too large for most models).

    Embeddings are what the embedding module outputs, which is what the soft prompt sits beside: Gemma multiplies
    its table by sqrt(hidden size) (25.3 for Gemma 3 270M), so raw table rows would start the prompt that much too
    small. For a plain nn.Embedding (GPT-2, Llama) the output is the row itself.
    """
    module = model.get_input_embeddings()
    vocab_size = module.weight.shape[0]
    n = cfg.num_virtual_tokens
    if cfg.init == "text":
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        return _embedded(module, (ids * (n // len(ids) + 1))[:n])
    if cfg.init == "vocab":
        # Common tokens come first in BPE vocabularies; rare rows are often untrained.
        pool = min(vocab_size, 5000)
        return _embedded(module, torch.randint(0, pool, (n,), generator=generator).tolist())
    return torch.randn(n, module.weight.shape[1], generator=generator) * _output_std(module, vocab_size)


@torch.no_grad()
def _embedded(module: nn.Module, ids: list[int]) -> torch.Tensor:
    return module(torch.tensor(ids, device=module.weight.device)).float().cpu()


@torch.no_grad()
def _output_std(module: nn.Module, vocab_size: int, rows: int = 16384) -> float:
    """Standard deviation of the embedding module's output over the whole vocabulary, in chunks of `rows` tokens
    (Gemma's 262k x 640 table at once would be a 0.7 GB temporary), accumulated in float64. A plain nn.Embedding
    outputs its rows: the table's own std, computed as it always was."""
    if type(module) is nn.Embedding:
        return float(module.weight.detach().float().std())
    total = squares = 0.0
    count = 0
    for start in range(0, vocab_size, rows):
        ids = torch.arange(start, min(start + rows, vocab_size), device=module.weight.device)
        out = module(ids).double()
        total += float(out.sum())
        squares += float((out * out).sum())
        count += out.numel()
    return math.sqrt(max(squares - total * total / count, 0.0) / (count - 1))


def apply(model: nn.Module, tokenizer, cfg: PromptConfig, seed: int = 0) -> SoftPrompt:
    """Freeze the model and return the trainable soft prompt."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    prompt = SoftPrompt(initial_embeddings(model, tokenizer, cfg, generator))
    return prompt.to(model.get_input_embeddings().weight.device)


def describe(cfg: PromptConfig) -> str:
    init = f"text {cfg.init_text!r}" if cfg.init == "text" else cfg.init
    return f"{cfg.num_virtual_tokens} virtual tokens, initialised from {init}"


class PromptMethod(Method):
    name = "prompt"
    title = "soft prompt tuning"
    tags = ("prompt-tuning",)
    peft_type = "PROMPT_TUNING"
    can_merge = False
    embeds_virtual_tokens = True
    merge_refusal = ("its soft prompt is input embeddings placed before every document, not a change of the "
                     "model's weights")
    encoder_prefix = "soft_prompt."

    def apply(self, model: nn.Module, tokenizer, cfg: RunConfig) -> Adapted:
        soft = apply(model, tokenizer, cfg.prompt, seed=cfg.train.seed)
        return Adapted(self, model, [soft.embeddings], describe(cfg.prompt), prompt_encoder=soft)

    def saved_tensors(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        return {PEFT_KEY: adapted.prompt_encoder.embeddings}

    def load_tensors(self, adapted: Adapted, tensors: dict[str, torch.Tensor], path: Path) -> None:
        if PEFT_KEY not in tensors:
            raise UserError(f"{path}: no tensor {PEFT_KEY} (a prompt-tuning adapter holds its virtual tokens there)")
        check_shape(path, PEFT_KEY, tensors[PEFT_KEY].shape, adapted.prompt_encoder.embeddings.shape)
        with torch.no_grad():
            adapted.prompt_encoder.embeddings.copy_(tensors[PEFT_KEY])

    def adapter_config(self, adapted: Adapted, cfg: RunConfig, base_model: str) -> dict:
        model_config = adapted.model.config
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.virtual_tokens(adapted),
            "token_dim": adapted.prompt_encoder.embeddings.shape[1],
            "num_transformer_submodules": 1, "num_attention_heads": model_config.num_attention_heads,
            "num_layers": model_config.num_hidden_layers,
            "prompt_tuning_init": "TEXT" if cfg.prompt.init == "text" else "RANDOM",
            "prompt_tuning_init_text": cfg.prompt.init_text if cfg.prompt.init == "text" else None,
            "tokenizer_name_or_path": base_model, "inference_mode": True,
        }

    def configure(self, cfg: RunConfig, adapter_config: dict, where: Path) -> None:
        check_decoder_only(adapter_config, where)
        cfg.prompt.num_virtual_tokens = number(adapter_config.get("num_virtual_tokens"), int, where,
                                               "num_virtual_tokens")
        cfg.prompt.init = "random"  # replaced by the saved embeddings; avoids tokenizing an init text

    def virtual_tokens(self, adapted: Adapted) -> int:
        return adapted.prompt_encoder.num_virtual_tokens

    def prepare_inputs(self, adapted: Adapted, embeds: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor | None):
        return adapted.prompt_encoder.insert(embeds, mask, labels)


METHOD = PromptMethod()
