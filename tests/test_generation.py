"""peftsum's greedy decoder (rows leave the batch once they end) against transformers' `generate`, token for token,
on tiny random-init models in fp32, left-padded prompts of different lengths."""

import pytest
import torch

from conftest import tiny_model
from peftsum.forward import collate, greedy
from peftsum.prompts import Encoded, IGNORE

MAX_NEW = 12


def prompts(seed: int = 0) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 250, (n,), generator=rng).tolist() for n in (5, 17, 9, 30, 12, 3)]


def hf_tokens(model, embeds, mask, eos: int | list[int], **settings) -> list[list[int]]:
    """`generate` on each row alone (unpadded): with left padding and embeddings, transformers' repetition penalty
    skips as many generated tokens as the row has padding (it takes the padding for a prompt inside input_ids)."""
    rows = []
    for row_embeds, row_mask in zip(embeds, mask):
        real = row_embeds[row_mask.bool()][None]
        row = model.generate(inputs_embeds=real, attention_mask=torch.ones(real.shape[:2], dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0,
                             **settings)[0].tolist()
        stops = [eos] if isinstance(eos, int) else eos
        ends = [i for i, token in enumerate(row) if token in stops]
        rows.append(row[:ends[0] + 1] if ends else row)  # peftsum's rows end with their stop token
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
        got = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids={eos}, **settings)
    assert got == expected
    lengths = {len(row) for row in got}
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW  # some rows did end early, others did not


def test_int8_linears_stand_in_for_every_linear_and_go_away(tokenizer):
    from torch import nn

    from peftsum.quantized import Int8Linear, int8_linears

    model = tiny_model("llama", tokenizer)
    layers = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    x = torch.randint(2, 250, (2, 9))
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with int8_linears(model, torch.device("cpu")):
            assert all(isinstance(model.get_submodule(name), Int8Linear) for name in layers)
            quantized = model(input_ids=x).logits
    assert all(model.get_submodule(name) is module for name, module in layers.items())
    error = float((quantized - plain).abs().max() / plain.abs().max())
    assert 0 < error < 0.05  # int8 rounding: close, not equal


def test_int8_is_for_the_cpu(tokenizer):
    from peftsum.errors import UserError
    from peftsum.quantized import int8_linears

    with pytest.raises(UserError, match="CPU only"):
        with int8_linears(tiny_model("llama", tokenizer), torch.device("cuda")):
            pass
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_stops_at_any_stop_token_like_generate(kind, tokenizer):
    """Two stop tokens (EOS and a chat template's end of turn): each row ends at the first of either it makes."""
    model = tiny_model(kind, tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts(1)], pad_id=0)
    embeds, mask = model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]
    with torch.no_grad():
        free = hf_tokens(model, embeds, mask, eos=1)
        first = [row[2] for row in free if len(row) > 2]  # tokens some rows make early: stop on two of them
        stops = sorted(set(first), key=first.count)[-2:]
        expected = hf_tokens(model, embeds, mask, eos=stops)
        got = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids=stops)
        alone = [greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids=[s]) for s in stops]
    assert len(stops) == 2 and got == expected
    ended = {row[-1] for row in got if len(row) < MAX_NEW}
    assert ended <= set(stops) and len(ended) == 2  # rows ended on each of the two
    assert all(got != one for one in alone)  # neither stop alone gives the same rows
