"""The two things every method does with a batch: compute the summary loss, and generate summaries.

All batches are left-padded with explicit position ids (counted from the first non-pad token), so training,
loss evaluation and generation share one layout, with the soft prompt (if any) right before the real tokens, and a
method's key/value prefix (if any) in the cache before the batch, its positions before the first real token.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Collection, Protocol

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..methods.base import Adapted
from .prompts import IGNORE, Encoded


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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: counted from each row's first real token (padding sits at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_inputs(adapted: Adapted, input_ids, attention_mask, labels=None):
    """Embeddings (with the method's own inputs, e.g. virtual tokens, placed in), mask, position ids and labels.

    The mask may be longer than the embeddings: it then covers the method's key/value prefix too (`prefix_cache`),
    whose positions come first, so the embeddings' positions continue after it.
    """
    embeds = adapted.model.get_input_embeddings()(input_ids)
    embeds, attention_mask, labels = adapted.method.prepare_inputs(adapted, embeds, attention_mask, labels)
    return embeds, attention_mask, positions(attention_mask)[:, -embeds.shape[1]:], labels


def filled_cache(model_config, prefix: list[tuple[torch.Tensor, torch.Tensor]], layer=None) -> DynamicCache:
    """A key/value cache holding `prefix` (per layer (keys, values)); `layer()` makes its layers, where given."""
    cache = DynamicCache(config=model_config)
    if layer is not None:
        cache.layers = [layer() for _ in cache.layers]
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys, values, index)
    return cache


def prefix_cache(adapted: Adapted, rows: int) -> DynamicCache | None:
    """The cache holding the method's key/value prefix for `rows` rows, or None where the method has none."""
    prefix = adapted.method.key_value_prefix(adapted, rows)
    return None if prefix is None else filled_cache(adapted.model.config, prefix)


def summary_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, keep): the next-token targets of every position but the last, and where they are summary tokens."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def summary_loss(adapted: Adapted, batch: dict[str, torch.Tensor], count: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over summary tokens, number of those tokens).

    The LM head runs only at positions that predict a summary token: on a 256-token example with a 40-token
    summary that skips ~85% of the head's work and its (vocab-sized) logits. `count`, the number of summary tokens
    when the caller knows it (training does, from the examples), spares a GPU the wait for the device to count them.
    """
    embeds, mask, position_ids, labels = model_inputs(adapted, batch["input_ids"], batch["attention_mask"],
                                                      batch["labels"])
    hidden = adapted.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                      past_key_values=prefix_cache(adapted, len(embeds)),
                                      use_cache=False).last_hidden_state
    targets, keep = summary_targets(labels)
    count = int(keep.sum()) if count is None else count
    rows, columns = torch.nonzero_static(keep, size=count).unbind(1)  # the positions of hidden[:, :-1][keep]
    # Gemma 2 caps its logits with tanh inside the causal-LM forward, which this loss bypasses (Gemma 3: no cap).
    softcap = getattr(adapted.model.config, "final_logit_softcapping", None)
    head = adapted.model.get_output_embeddings()
    return head_loss(head, hidden[rows, columns], targets[rows, columns], softcap), count


def whole_model_loss(adapted: Adapted, batch: dict[str, torch.Tensor], count: int | None = None
                     ) -> tuple[torch.Tensor, int]:
    """`summary_loss` through the model's own forward, which FSDP needs (its hooks run on the root module).

    In a left-padded batch every summary ends the row, so the LM head runs over the last columns only: from the first
    column that predicts a summary token in any row. (Full fine-tuning has no method inputs to place in.) `count` is
    accepted for `summary_loss`'s signature; the columns are counted on the device.
    """
    labels, mask = batch["labels"], batch["attention_mask"]
    targets, keep = summary_targets(labels)
    columns = keep.any(0).nonzero()
    first = int(columns[0]) if len(columns) else targets.shape[1] - 1
    logits = adapted.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask),
                           use_cache=False, logits_to_keep=labels.shape[1] - first).logits[:, :-1]
    keep = keep[:, first:]
    return F.cross_entropy(logits[keep].float(), targets[:, first:][keep], reduction="sum"), int(keep.sum())


HEAD_ROWS = 256  # positions per LM-head chunk: 256 x 49,152 fp32 logits = 50 MB for SmolLM2, 268 MB for Gemma 3


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              softcap: float | None = None) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden)` (capped to +-softcap by tanh, if given) against `targets`, in chunks of
    exactly HEAD_ROWS positions.

    The number of summary positions changes with every batch; vocabulary-sized logits of a new size every step
    fragmented the C heap (peak RSS grew by ~2 GB over 20 steps of compiled training). Fixed-size chunks, the last
    one padded with ignored positions, allocate the same blocks every step.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), HEAD_ROWS):
        rows, wanted = hidden[start:start + HEAD_ROWS], targets[start:start + HEAD_ROWS]
        if len(rows) < HEAD_ROWS:
            rows = torch.cat([rows, rows.new_zeros(HEAD_ROWS - len(rows), rows.shape[1])])
            wanted = torch.cat([wanted, wanted.new_full((HEAD_ROWS - len(wanted),), IGNORE)])
        logits = head(rows).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, wanted, reduction="sum", ignore_index=IGNORE)
    return total


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


class Decoder(Protocol):
    """What greedy decoding can run instead of the model's forward (`fast.generation` gives one where it is exact):
    the next-token logits (fp32) after the prompts and after each step, writing keys and values into a cache of
    `ReservedLayer`s."""

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor: ...

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor: ...


@torch.no_grad()
def generate_batch(adapted: Adapted, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, num_beams: int,
                   no_repeat_ngram_size: int, repetition_penalty: float, stop_ids: tuple[int, ...],
                   decoder: Decoder | None = None) -> list[str]:
    """Greedy (or beam) summaries for a batch of tokenized prompts, decoded and stripped; each ends at the first of
    `stop_ids` it makes (the format's: EOS, and the chat template's end of turn). Greedy decoding goes through
    `decoder` where given."""
    device = adapted.model.get_input_embeddings().weight.device
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts], tokenizer.pad_token_id)
    embeds, mask, _, _ = model_inputs(adapted, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    prefix = adapted.method.key_value_prefix(adapted, len(prompts) * num_beams)  # beams: one row each
    # transformers applies the LM head to the last position as a strided slice, hidden[:, -1:, :]; torch.matmul then
    # broadcasts the head's weight over the batch in a copy (16 x 576 x 49152 for SmolLM2: ~1 s per prefill, ~200x
    # the product itself). A contiguous input takes the plain matmul.
    head = adapted.model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    try:
        if num_beams == 1:
            output = greedy(adapted.model, embeds, mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                            no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                            prefix=prefix, decoder=decoder)
        else:
            output = _hf_generate(adapted.model, tokenizer, embeds, mask, stop_ids, prefix,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)
    finally:
        head.remove()
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


def _hf_generate(model, tokenizer, embeds, mask, stop_ids: tuple[int, ...], prefix=None, **settings) -> torch.Tensor:
    if prefix is not None:
        # generate takes inputs_embeds for the whole sequence, the part already in the cache included, and passes the
        # model only the rest: placeholders stand for the prefix (the mask covers it already).
        settings["past_key_values"] = filled_cache(model.config, prefix)
        placeholders = embeds.new_zeros((len(embeds), mask.shape[1] - embeds.shape[1], embeds.shape[2]))
        embeds = torch.cat([placeholders, embeds], dim=1)
    with warnings.catch_warnings():
        # transformers warns that with inputs_embeds the n-gram ban covers generated tokens only: that is what we
        # want, since a summary may well repeat phrases of its document.
        warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
        # With inputs_embeds, generate returns only the new tokens.
        return model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, temperature=None, top_p=None,
                              top_k=None, eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id,
                              **settings)


# Prompt positions per prefill part (rows x padded length). Products of ~2k rows still run at the matmul peak, and
# their activations stay small enough to be reused rather than mapped fresh from the OS and page-faulted in at every
# use (a whole batch of 64 prompts makes ~40 MB a tensor). 64 XSum prompts of 191 tokens, three runs each, the 2-core
# Zen 4: fp32 18.3-19.7 s in parts of 16 rows, 17.4-18.0 s in parts of 8, 18.2-19.1 s in parts of 4; bf16 11.5-11.8,
# 10.9-11.6, 11.4-13.0 s. 30 CNN/DailyMail prompts of 447 tokens, bf16: 13.9-15.0 s at 16 rows, 13.3-14.5 at 8,
# 13.3-14.2 at 4, 14.8-15.5 at 2. End to end at 2048 (fp32, batch 64): prefill 19.5-20.0 -> 16.5-17.3 s.
PREFILL_TOKENS = 2048
PREFILL_ROWS = 16  # on a GPU (its caching allocator reuses memory, and larger products fill it better): as before


class ReservedLayer(DynamicLayer):
    """A key/value cache layer that makes room for `reserve` new tokens once, at the prompt, and writes each new token
    in place. transformers' DynamicLayer concatenates the whole cache at every token: with 64 prompts of ~280 tokens,
    0.43 ms per tensor, two per layer, ~26 ms per decoding step over 30 layers; without it, 1.1x the summaries/s."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve, self.length = reserve, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.key_buffer = self._room(key_states)
            self.value_buffer = self._room(value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # more tokens than reserved: grow as DynamicLayer does
            self.key_buffer = torch.cat([self.key_buffer[..., :self.length, :], key_states], dim=-2)
            self.value_buffer = torch.cat([self.value_buffer[..., :self.length, :], value_states], dim=-2)
        else:
            self.key_buffer[..., self.length:end, :] = key_states
            self.value_buffer[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _room(self, states: torch.Tensor) -> torch.Tensor:
        rows, heads, length, dim = states.shape
        return states.new_empty((rows, heads, length + self.reserve, dim))

    def append_rows(self, others: list["ReservedLayer"]) -> None:
        """Take the rows of other layers that hold the same positions (prompts prefilled in parts) after this one's."""
        if others:
            self.key_buffer = torch.cat([self.key_buffer] + [o.key_buffer for o in others])
            self.value_buffer = torch.cat([self.value_buffer] + [o.value_buffer for o in others])
            self.keys, self.values = self.key_buffer[..., :self.length, :], self.value_buffer[..., :self.length, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.length:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[..., :self.length, :], self.value_buffer[..., :self.length, :]


def greedy(model, embeds: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, stop_ids: Collection[int],
           no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
           prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
           decoder: Decoder | None = None) -> list[list[int]]:
    """Greedy decoding from left-padded prompt embeddings: the new tokens of each row, up to and including the first
    of `stop_ids` it makes (EOS, and the chat template's end of turn).

    With a key/value `prefix` (per layer, one row per prompt), each prompt is prefilled into a cache that holds it
    already, and `mask` covers it in front. With a `decoder` (fast.generation's: the same forward in fewer
    operations), the prompts and the decoding steps go through it instead of the model's forward.

    What `generate(num_beams=1)` computes, token for token (tests/test_generation.py checks it), with one difference
    in the work: a row that has ended leaves the batch and its key/value cache, where `generate` keeps computing it
    until the last row ends. The n-gram ban and the repetition penalty see every generated token and no prompt token.
    (transformers' own repetition penalty, given embeddings, skips as many generated tokens as the row has left
    padding: it takes the padding for a prompt inside input_ids.)
    """
    processors = _logits_processors(repetition_penalty, no_repeat_ngram_size)
    stops = torch.tensor(sorted(set(stop_ids)), device=embeds.device)
    position_ids = positions(mask)[:, -embeds.shape[1]:]
    # Other cache layouts (sliding windows...) keep transformers' own cache, which the decoder does not write into.
    reservable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers or [None])
    decoder = decoder if reservable else None
    # A layer's first update reserves room for what follows it: the new tokens, and the prompt after a prefix.
    reserve = (max_new_tokens + (embeds.shape[1] if prefix is not None else 0)) if reservable else None
    cache, logits = _prefill(model, embeds, mask, position_ids, prefix, reserve, decoder)
    rows = embeds.shape[0]
    alive = torch.arange(rows)  # the rows still decoding, in batch order
    position = position_ids[:, -1]
    history = torch.empty((rows, 0), dtype=torch.long, device=embeds.device)  # alive rows' new tokens
    made: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        tokens = processors(history, logits).argmax(-1)
        for row, token in zip(alive.tolist(), tokens.tolist()):
            made[row].append(token)
        history = torch.cat([history, tokens[:, None]], dim=1)
        going = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # drop the rows that ended, from the batch and from the cache
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, tokens, history, mask, position = (alive[keep.cpu()], tokens[keep], history[keep], mask[keep],
                                                      position[keep])
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        position = position + 1
        logits = _step(model, tokens, mask, position, cache, decoder)
    return made


def _logits_processors(repetition_penalty: float, no_repeat_ngram_size: int):
    """transformers' processors for the repetition penalty and the n-gram ban, where asked."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    return processors


def _prefill(model, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
             prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, reserve: int | None,
             decoder: Decoder | None) -> tuple[DynamicCache, torch.Tensor]:
    """(cache, next-token logits in fp32) after the prompts. The prompts go through the model (or `decoder`) in parts
    of about PREFILL_TOKENS positions on a CPU, PREFILL_ROWS rows elsewhere, each into a cache of `ReservedLayer`s
    making room for `reserve` more positions; the parts' caches are then joined into one. `reserve` None: in one
    part, into transformers' own cache."""
    rows = embeds.shape[0]
    if reserve is None:
        chunk = rows
    elif embeds.device.type == "cpu":
        chunk = max(1, PREFILL_TOKENS // embeds.shape[1])
    else:
        chunk = PREFILL_ROWS
    caches, logits = [], []
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        cache = filled_cache(model.config, [(k[part], v[part]) for k, v in prefix or []],
                             (lambda: ReservedLayer(reserve)) if reserve is not None else None)
        if decoder is not None:
            logits.append(decoder.prefill(embeds[part], mask[part], position_ids[part], cache))
        else:
            logits.append(model(inputs_embeds=embeds[part], attention_mask=mask[part],
                                position_ids=position_ids[part], past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1].float())
        caches.append(cache)
    cache = caches[0]
    if len(caches) > 1:  # prompts prefilled in parts: one cache holds them all
        for layer, *others in zip(cache.layers, *(c.layers for c in caches[1:])):
            layer.append_rows(others)
    return cache, torch.cat(logits)


def _step(model, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: DynamicCache,
          decoder: Decoder | None) -> torch.Tensor:
    """The next-token logits (fp32) after one new token per row, through `decoder` where given."""
    if decoder is not None:
        return decoder(tokens, mask, position, cache)
    return model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None],
                 past_key_values=cache, use_cache=True).logits[:, -1].float()
