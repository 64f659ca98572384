"""A Llama block's forward with its projections joined: one matmul for q/k/v, one for gate/up, LoRA's A matrices on
the shared input in one product. For compiled training (compiled.py); the model's own code is not touched.

Separately, q, k and v each read the normed input and make their own output, and their input gradients are three
products added together; joined, the block reads its input once per group and the backward makes one product. The
frozen weights are joined in place: within `joined_projections`, q/k/v's (and gate/up's) weights are row slices of
one matrix (no copy kept), and on exit each gets its own storage again. LoRA on all of q, k and v (no dropout) runs
as one rank-3r product, `x @ [A_q; A_k; A_v]^T`, then a block-diagonal `[B_q, B_k, B_v]`: one pass over x instead
of three. Any other LoRA layout (a subset of q/k/v, dropout, which draws one mask per layer) adds each layer's own
update to its slice.

Only blocks whose joined weights are all frozen are joined (a trained weight needs its own gradient), and only the
plain Llama block (SmolLM2): other architectures train with their own forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama import modeling_llama as llama

from ..core.models import transformer_blocks

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def joined_groups(block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A Llama block's projections that read one input, in their joined order: q/k/v (of the normed input) and
    gate/up (of the normed attention output). decode.py joins the same."""
    return [getattr(block.self_attn, n) for n in QKV], [getattr(block.mlp, n) for n in GATE_UP]


def _low_rank(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """What `m`'s LoRA, if any, adds to its output (LoRA's `plain_low_rank`): (A, scale * B, dropout), or None."""
    lora = getattr(m, "lora", None)
    return None if lora is None else lora.plain_low_rank()


def _plain_or_lora(m: nn.Module) -> bool:
    """A frozen bias-free nn.Linear with no hooks but, at most, a plain LoRA's: the joined forward calls no module of
    the group, so any other hook (IA3's scaling, DoRA's magnitude) would be skipped."""
    if type(m) is not nn.Linear or m.bias is not None or m.weight.requires_grad or m._forward_pre_hooks:
        return False
    if getattr(m, "lora", None) is None:
        return not m._forward_hooks
    return _low_rank(m) is not None and len(m._forward_hooks) == 1


def _joinable(block: nn.Module) -> bool:
    if type(block) is not llama.LlamaDecoderLayer or block._forward_hooks or block._forward_pre_hooks:
        return False
    return all(_plain_or_lora(m) for group in joined_groups(block) for m in group)


def joinable(model: nn.Module) -> bool:
    """Whether every transformer block of `model` can run the joined forward."""
    return all(_joinable(block) for block in transformer_blocks(model))


def _join(modules: list[nn.Linear]) -> torch.Tensor:
    """One matrix holding the modules' weights as consecutive row blocks; each weight becomes a view of it."""
    joined = torch.cat([m.weight.detach() for m in modules])
    start = 0
    for m in modules:
        m.weight.data = joined[start:start + m.out_features]
        start += m.out_features
    return joined


def _split(modules: list[nn.Linear]) -> None:
    for m in modules:
        m.weight.data = m.weight.data.clone()


@contextlib.contextmanager
def joined_projections(model: nn.Module):
    """Within the block, every block of `model` holds `_joined_qkv` and `_joined_gate_up` (see the module docstring)."""
    blocks = transformer_blocks(model)
    for block in blocks:
        qkv, gate_up = joined_groups(block)
        block._joined_qkv, block._joined_gate_up = _join(qkv), _join(gate_up)
    try:
        yield
    finally:
        for block in blocks:
            for group in joined_groups(block):
                _split(group)
            del block._joined_qkv, block._joined_gate_up


def _update(x: torch.Tensor, out: torch.Tensor, modules: list[nn.Linear]) -> torch.Tensor:
    """`out` (the joined product) plus each module's LoRA update, in the activations' dtype."""
    low_ranks = [_low_rank(m) for m in modules]
    if not any(low_ranks):
        return out
    if all(low_ranks) and not any(dropout for _, _, dropout in low_ranks) \
            and len({a.shape[0] for a, _, _ in low_ranks}) == 1:
        a = torch.cat([a for a, _, _ in low_ranks]).to(x.dtype)
        b = torch.block_diag(*[scaled_b for _, scaled_b, _ in low_ranks]).to(x.dtype)
        return out + F.linear(F.linear(x, a), b)
    parts = list(out.split([m.out_features for m in modules], dim=-1))
    for i, (m, low_rank) in enumerate(zip(modules, low_ranks)):
        if low_rank is not None:
            parts[i] = parts[i] + m.lora(x)  # the adapter's own forward: its dropout draws this layer's mask
    return torch.cat(parts, dim=-1)


def joined_forward(block: nn.Module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                   past_key_values=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    """What `LlamaDecoderLayer.forward` computes in training (no key/value cache), with the joined projections."""
    if past_key_values is not None:
        raise RuntimeError("the joined block forward is for training, without a key/value cache")
    attn, mlp = block.self_attn, block.mlp
    qkv_modules, gate_up_modules = joined_groups(block)
    residual = hidden_states
    x = block.input_layernorm(hidden_states)
    shape = x.shape[:-1]
    qkv = _update(x, F.linear(x, block._joined_qkv), qkv_modules)
    q, k, v = (t.view(*shape, -1, attn.head_dim).transpose(1, 2)
               for t in qkv.split([m.out_features for m in qkv_modules], dim=-1))
    cos, sin = position_embeddings
    q, k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    attention = llama.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                            llama.eager_attention_forward)
    out, _ = attention(attn, q, k, v, attention_mask, dropout=attn.attention_dropout if attn.training else 0.0,
                       scaling=attn.scaling, **kwargs)
    hidden_states = residual + attn.o_proj(out.reshape(*shape, -1).contiguous())  # o_proj's LoRA hook runs here
    residual = hidden_states
    x = block.post_attention_layernorm(hidden_states)
    gate, up = _update(x, F.linear(x, block._joined_gate_up), gate_up_modules).chunk(2, dim=-1)
    return residual + mlp.down_proj(mlp.act_fn(gate) * up)
