"""peftsum's greedy decoder (rows leave the batch once they end) against transformers' `generate`, token for token,
on tiny random-init models in fp32, left-padded prompts of different lengths."""

import pytest
import torch

from conftest import tiny_model
from peftsum.forward import collate, greedy
from peftsum.data import Encoded, IGNORE

MAX_NEW = 12


def prompts(seed: int = 0) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 250, (n,), generator=rng).tolist() for n in (5, 17, 9, 30, 12, 3)]


def hf_tokens(model, embeds, mask, eos: int, **settings) -> list[list[int]]:
    """`generate` on each row alone (unpadded): with left padding and embeddings, transformers' repetition penalty
    skips as many generated tokens as the row has padding (it takes the padding for a prompt inside input_ids)."""
    rows = []
    for row_embeds, row_mask in zip(embeds, mask):
        real = row_embeds[row_mask.bool()][None]
        row = model.generate(inputs_embeds=real, attention_mask=torch.ones(real.shape[:2], dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0,
                             **settings)[0].tolist()
        rows.append(row[:row.index(eos) + 1] if eos in row else row)  # peftsum's rows end with their EOS
    return rows


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("settings", [{}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.3}])
@pytest.mark.parametrize("prefill_rows", [16, 4])  # the whole batch at once, or in parts joined in one cache
def test_greedy_equals_generate(kind, settings, prefill_rows, tokenizer, monkeypatch):
    monkeypatch.setattr("peftsum.forward.PREFILL_ROWS", prefill_rows)
    model = tiny_model(kind, tokenizer)
    with torch.no_grad():  # a random model's logits are near-uniform: sharpen them, so float noise cannot flip a tie
        model.get_output_embeddings().weight.mul_(20)
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts()], pad_id=0)
    embeds, mask = model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]
    with torch.no_grad():
        free = hf_tokens(model, embeds, mask, eos=1, **settings)
        # An EOS that some rows make early and others never: the rows that end must leave the batch without changing
        # what the others generate.
        counts = {}
        for row in free:
            for position, token in enumerate(row[:MAX_NEW // 2]):
                counts.setdefault(token, set()).add(position)
        eos = max(counts, key=lambda t: len(counts[t]))
        expected = hf_tokens(model, embeds, mask, eos=eos, **settings)
        got = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, **settings)
    assert got == expected
    lengths = {len(row) for row in got}
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW  # some rows did end early, others did not
