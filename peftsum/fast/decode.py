"""A Llama model's (SmolLM2's) forward for greedy generation, in a few tensor operations per block: the prompts
(prefill) and each decoding step.

At one new token per row, a step's matmuls are small (16 x 576 by 576 x 1536) and the model's own forward spends
as much time around them as in them: masks, position bookkeeping, the cache's API, ~80 operator calls per block.
This step makes ~35: the frozen q/k/v weights joined into one matrix and gate/up into another (one product each,
as fused.py does for training), and, on a CPU, every weight re-laid once in oneDNN's blocked format for its matmul
(what inductor does for frozen weights), which the small products need most: at 16 rows, 301 -> 211 us for gate/up,
176 -> 93 us for q/k/v, 7.7 -> 4.5 ms for SmolLM2's LM head. A decoding step at batch 16 on the 2-core Zen 4:
~84 -> ~55 ms (BENCHMARKS.md). The prefill's products are large and near the matmul peak either way; what it saves
there is the rest (the per-block bookkeeping, and where weights are fp32 under autocast, a cast of every weight at
every call): 64 prompts of 191 tokens, 12.5 -> 10.3 s (three runs each, bf16).

It computes what `LlamaDecoderLayer` does under the same autocast: the products in the compute dtype, the norms and
the residual stream in the stored dtypes, attention by SDPA as transformers' SDPA path calls it (the prefill:
causal without a mask where no row is padded and no prefix is cached, else the padding mask; a decoding step: one
query per row on the cache's key/value heads with the padding mask). tests/test_generation.py: the same tokens as
`generate` in fp32; in bf16, bit-equal prefill logits and bit-equal step logits for a padded batch. For a decoding
step without padding transformers drops the mask and calls SDPA's GQA kernel instead (3x slower here at one
query), which rounds differently in bf16: logits of SmolLM2 then differ by up to ~0.4 and a near-tie can go the
other way (the demo's untouched ROUGE-1 37.9 vs 37.4, within its interval).

The copies it makes (one more of every weight, ~270 MB for SmolLM2 in bf16; int8 for `eval.quantize int8`, whose
products are quantized.py's) live for one `generate_from` call. Any model it does not cover exactly (another
architecture, a bias, an unmerged adapter's hook, a replaced linear layer, logit capping) generates through its own
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama import modeling_llama as llama

from ..methods.base import unhooked
from ..methods.prefix.method import kv_layout
from .fused import joined_groups
from .quantized import int8_product, int8_weight


def _covered(model: nn.Module) -> bool:
    """Whether the lean step computes exactly what the model's forward does."""
    if type(model) is not llama.LlamaForCausalLM or not unhooked(model) or not unhooked(model.model):
        return False
    config = model.config
    if config.hidden_act != "silu" or getattr(config, "final_logit_softcapping", None):
        return False
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or not unhooked(head):
        return False
    for block in model.model.layers:
        parts = [block, block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm]
        if type(block) is not llama.LlamaDecoderLayer or not all(unhooked(p) for p in parts):
            return False
        qkv, gate_up = joined_groups(block)
        linears = [*qkv, block.self_attn.o_proj, *gate_up, block.mlp.down_proj]
        if any(type(m) is not nn.Linear or m.bias is not None or not unhooked(m) for m in linears):
            return False
    return True


def _packer(device: torch.device, dtype: torch.dtype, rows: int, int8: bool = False):
    """(pack, product): int8 weights and their per-token product (quantized.py) for `int8`; else re-lay a weight
    for oneDNN's matmul and multiply by it, where this build can; else the weight as it is and F.linear."""
    if int8:
        return int8_weight, int8_product
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
        try:
            probe = torch.ones(rows, 8, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8, dtype=dtype), rows)
            if torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
                           torch.full((rows, 4), 8.0, dtype=dtype)):
                return (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows),
                        lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
        except (RuntimeError, AttributeError):  # a build without these kernels
            pass
    return (lambda w: w), F.linear


class LeanDecoder:
    """`decoder.prefill(embeds, mask, position_ids, cache)` and `decoder(tokens, mask, position, cache)`: the
    next-token logits (fp32) after the prompts and after each decoding step, writing keys and values into `cache`
    (a ReservedLayer cache, one layer per block)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, rows: int, int8: bool = False):
        device = model.get_input_embeddings().weight.device
        pack, self.product = _packer(device, dtype, rows, int8)
        # A weight in the compute dtype, contiguous; int8 quantizes from the stored weight (one rounding, not two).
        cast = (lambda w: w) if int8 else (lambda w: w.to(dtype).contiguous())
        self.model, self.dtype = model, dtype
        config = model.config
        _, kv_heads, head_dim = kv_layout(config)
        self._shape = (config.num_attention_heads, kv_heads, head_dim)
        self.blocks = []
        with torch.no_grad():
            for block in model.model.layers:
                qkv, gate_up = joined_groups(block)
                self.blocks.append((
                    block.input_layernorm,
                    pack(cast(torch.cat([m.weight for m in qkv]))),
                    pack(cast(block.self_attn.o_proj.weight)),
                    block.post_attention_layernorm,
                    pack(cast(torch.cat([m.weight for m in gate_up]))),
                    pack(cast(block.mlp.down_proj.weight)),
                    block.self_attn.scaling,
                ))
            self.head = pack(cast(model.get_output_embeddings().weight))

    @classmethod
    def build(cls, model: nn.Module, dtype: torch.dtype, rows: int, int8: bool = False) -> "LeanDecoder | None":
        """The decoder for `model` (as it is now: LoRA merged, say) computing in `dtype` (autocast's, or fp32 for
        none), its products int8 for `int8` (eval.quantize), or None where it would not be exact."""
        if not _covered(model):
            return None
        if dtype == torch.float32 and any(p.dtype != dtype for p in model.parameters()):
            return None  # without autocast, each product runs in its weight's dtype: not one dtype for all
        return cls(model, dtype, rows, int8)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """The next-token logits (fp32) after left-padded prompt embeddings (rows, positions, hidden), writing their
        keys and values into `cache` (empty, or holding a key/value prefix that `mask` covers in front)."""
        rows, length, (heads, kv_heads, dim) = embeds.shape[0], embeds.shape[1], self._shape
        cos, sin = self.model.model.rotary_emb(embeds, position_ids)  # (rows, positions, head_dim)
        cos, sin = cos[:, None], sin[:, None]  # over (rows, heads, positions, head_dim)
        held = mask.shape[1] - length  # prefix positions already in the cache
        if held == 0 and bool(mask.all()):
            allowed = None  # transformers' choice too: causal attention with no mask
        else:
            # Each prompt position sees the real positions up to itself, and itself: a padding position then attends
            # to itself alone and stays finite (what it computes reaches no real position).
            query = torch.arange(length, device=mask.device)[:, None] + held
            key = torch.arange(mask.shape[1], device=mask.device)[None]
            allowed = ((key <= query) & mask.bool()[:, None, :] | (key == query))[:, None]

        def attend(q, k, v, layer, scaling):
            q = q.view(rows, length, heads, dim).transpose(1, 2)
            k = k.view(rows, length, kv_heads, dim).transpose(1, 2)
            v = v.view(rows, length, kv_heads, dim).transpose(1, 2)
            q, k = self._rotated(q, k, cos, sin)
            keys, values = layer.update(k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, is_causal=allowed is None,
                                                 scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).reshape(rows, length, heads * dim)

        hidden = self._blocks(embeds, cache, attend)
        return self.product(self.model.model.norm(hidden[:, -1]).to(self.dtype), self.head).float()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """The next-token logits (fp32) of one decoding step, writing the new keys and values into `cache`."""
        rows, (heads, kv_heads, dim) = len(tokens), self._shape
        hidden = self.model.get_input_embeddings()(tokens)  # (rows, hidden): one position per row
        cos, sin = self.model.model.rotary_emb(hidden, position[:, None])  # (rows, 1, head_dim)
        cos, sin = cos[:, None], sin[:, None]  # over (rows, kv_heads, heads per kv head, head_dim)
        allowed = mask.bool()[:, None, None, :]

        def attend(q, k, v, layer, scaling):
            # The query's heads grouped by the key/value head they share, as transformers' SDPA path packs them.
            q = q.view(rows, kv_heads, heads // kv_heads, dim)
            k, v = k.view(rows, kv_heads, 1, dim), v.view(rows, kv_heads, 1, dim)
            q, k = self._rotated(q, k, cos, sin)
            keys, values = layer.update(k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scaling)
            return out.reshape(rows, heads * dim)

        hidden = self._blocks(hidden, cache, attend)
        return self.product(self.model.model.norm(hidden).to(self.dtype), self.head).float()

    def _rotated(self, q, k, cos, sin):
        """q and k with rotary embeddings, k in the compute dtype.

        The rotation runs in the dtype transformers' does (fp32: cos and sin follow the fp32 residual stream), which
        leaves fp32 keys in transformers' cache; SDPA under autocast casts them to bf16 at every step, a tenth of a
        decoding step at batch 64. Stored cast once, they give SDPA the same values."""
        return q * cos + llama.rotate_half(q) * sin, (k * cos + llama.rotate_half(k) * sin).to(self.dtype)

    def _blocks(self, hidden: torch.Tensor, cache, attend) -> torch.Tensor:
        """The residual stream after every block, `attend(q, k, v, cache layer, scaling)` giving attention's output
        for the joined q/k/v product."""
        heads, kv_heads, dim = self._shape
        for (norm_in, qkv, o, norm_post, gate_up, down, scaling), layer in zip(self.blocks, cache.layers):
            q, k, v = self.product(norm_in(hidden).to(self.dtype), qkv).split(
                [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            hidden = hidden + self.product(attend(q, k, v, layer, scaling), o)
            gate, up = self.product(norm_post(hidden).to(self.dtype), gate_up).chunk(2, dim=-1)
            hidden = hidden + self.product(F.silu(gate) * up, down)
        return hidden
