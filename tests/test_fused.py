"""The joined block forward (fused.py: one matmul for q/k/v and for gate/up, LoRA's A matrices in one product)
computes what the model's own blocks compute: fp32 tiny Llama, loss and every trainable gradient, eager (the same
function is what compiled training runs)."""

import functools

import pytest
import torch
from conftest import tiny_model

from peftsum.core.models import transformer_blocks
from peftsum.fast import fused
from peftsum.methods.finetune import method as finetune
from peftsum.methods.finetune.config import FinetuneConfig
from peftsum.methods.lora import method as lora
from peftsum.methods.lora.config import LoraConfig


def loss_and_grads(model, params, batch, joined: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks on both sides
    blocks = transformer_blocks(model)
    with fused.joined_projections(model) if joined else torch.enable_grad():
        if joined:
            for block in blocks:
                block._compiled_call_impl = functools.partial(fused.joined_forward, block)
        try:
            loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch, use_cache=False).loss
            loss.backward()
        finally:
            for block in blocks:
                block._compiled_call_impl = None
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("targets, dropout", [(None, 0.0), (["q_proj", "v_proj", "up_proj"], 0.0),
                                              (None, 0.2)])
def test_joined_forward_equals_the_model_forward_with_lora(targets, dropout, tokenizer):
    model = tiny_model("llama", tokenizer).train()
    adapters = lora.apply(model, LoraConfig(rank=4, alpha=8.0, dropout=dropout, targets=targets))
    with torch.no_grad():
        for module in adapters.values():
            module.lora_B.normal_(0, 0.3)  # B = 0 would hide a wrong B product
    params = [p for a in adapters.values() for p in a.parameters()]
    assert fused.joinable(model)
    batch = torch.randint(2, 250, (3, 19), generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = loss_and_grads(model, params, batch, joined=False)
    joined_loss, joined_grads = loss_and_grads(model, params, batch, joined=True)
    assert joined_loss == pytest.approx(plain_loss.item(), rel=1e-6)
    for plain, joined in zip(plain_grads, joined_grads):
        assert plain.abs().max() > 0
        torch.testing.assert_close(joined, plain, rtol=1e-5, atol=1e-6)


def test_joined_weights_are_views_within_and_own_storage_after(tokenizer):
    model = tiny_model("llama", tokenizer)
    model.requires_grad_(False)
    attn = transformer_blocks(model)[0].self_attn
    before = [attn.q_proj.weight.clone(), attn.v_proj.weight.clone()]
    with fused.joined_projections(model):
        joined = transformer_blocks(model)[0]._joined_qkv
        assert attn.q_proj.weight.data_ptr() == joined.data_ptr()
        assert attn.k_proj.weight.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    assert torch.equal(attn.q_proj.weight, before[0]) and torch.equal(attn.v_proj.weight, before[1])
    assert not hasattr(transformer_blocks(model)[0], "_joined_qkv")


def test_only_frozen_llama_blocks_are_joined(tokenizer):
    gpt2 = tiny_model("gpt2", tokenizer).requires_grad_(False)
    assert not fused.joinable(gpt2)
    llama = tiny_model("llama", tokenizer)
    finetune.apply(llama, FinetuneConfig(head=True, last_blocks=1))  # a trained block needs its own weights' grads
    assert not fused.joinable(llama)
    finetune.apply(llama, FinetuneConfig(head=True))
    assert fused.joinable(llama)
