"""The two things every method does with a batch: compute the summary loss, and generate summaries.

All batches are left-padded with explicit position ids (counted from the first non-pad token), so training,
loss evaluation and generation share one layout, with the soft prompt (if any) right before the real tokens.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from .data import IGNORE, Encoded
from .methods import Adapted


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of encoded examples into input_ids, attention_mask and labels tensors."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, length - n:] = torch.tensor(e.input_ids)
        labels[row, length - n:] = torch.tensor(e.labels)
        mask[row, length - n:] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def model_inputs(adapted: Adapted, input_ids, attention_mask, labels=None):
    """Embeddings (with virtual tokens inserted), mask, position ids and labels for the model."""
    embeds = adapted.model.get_input_embeddings()(input_ids)
    if adapted.soft_prompt is not None:
        embeds, attention_mask, labels = adapted.soft_prompt.insert(embeds, attention_mask, labels)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return embeds, attention_mask, position_ids, labels


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def summary_loss(adapted: Adapted, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over summary tokens, number of those tokens).

    The LM head runs only at positions that predict a summary token: on a 256-token example with a 40-token
    summary that skips ~85% of the head's work and its (vocab-sized) logits.
    """
    embeds, mask, positions, labels = model_inputs(adapted, batch["input_ids"], batch["attention_mask"], batch["labels"])
    hidden = adapted.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                      use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = adapted.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


@torch.no_grad()
def generate_batch(adapted: Adapted, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, num_beams: int,
                   no_repeat_ngram_size: int, repetition_penalty: float) -> list[str]:
    """Greedy (or beam) summaries for a batch of tokenized prompts, decoded and stripped."""
    device = adapted.model.get_input_embeddings().weight.device
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts], tokenizer.pad_token_id)
    embeds, mask, _, _ = model_inputs(adapted, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    # transformers applies the LM head to the last position as a strided slice, hidden[:, -1:, :]; torch.matmul then
    # broadcasts the head's weight over the batch in a copy (16 x 576 x 49152 for SmolLM2: ~1 s per prefill, ~200x
    # the product itself). A contiguous input takes the plain matmul.
    head = adapted.model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    with warnings.catch_warnings(), contextlib.ExitStack() as cleanup:
        cleanup.callback(head.remove)
        # transformers warns that with inputs_embeds the n-gram ban covers generated tokens only: that is what we
        # want, since a summary may well repeat phrases of its document.
        warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
        output = adapted.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
            do_sample=False, temperature=None, top_p=None, top_k=None,
            no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    # With inputs_embeds, generate returns only the new tokens.
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
