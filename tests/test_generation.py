"""peftsum's greedy decoder (rows leave the batch once they end) against transformers' `generate`, token for token,
on tiny random-init models in fp32, left-padded prompts of different lengths."""

import pytest
import torch
from conftest import tiny_model

from peftsum.core.forward import collate, greedy
from peftsum.core.prompts import IGNORE, Encoded

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
# The whole batch at once, or in parts joined in one cache (prompts of a few positions: one row a part).
@pytest.mark.parametrize("prefill_tokens", [10**6, 1])
def test_greedy_equals_generate(kind, settings, prefill_tokens, tokenizer, monkeypatch):
    monkeypatch.setattr("peftsum.core.forward.PREFILL_TOKENS", prefill_tokens)
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


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_int8_linears_stand_in_for_every_linear_and_go_away(kind, tokenizer):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from peftsum.fast.quantized import Int8Linear, int8_linears

    model = tiny_model(kind, tokenizer)
    layers = {name: m for name, m in model.named_modules() if type(m) in (nn.Linear, Conv1D)}
    assert len(layers) > 1  # GPT-2's blocks are Conv1D: they count too, not only its LM head
    x = torch.randint(2, 250, (2, 9))
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with int8_linears(model, torch.device("cpu")):
            assert all(isinstance(model.get_submodule(name), Int8Linear) for name in layers)
            quantized = model(input_ids=x).logits
    assert all(model.get_submodule(name) is module for name, module in layers.items())
    error = float((quantized - plain).abs().max() / plain.abs().max())
    assert 0 < error < 0.05  # int8 rounding: close, not equal


def test_int8_linears_refuse_a_layer_whose_hook_changes_its_output(tokenizer):
    from peftsum.fast.quantized import int8_linears

    model = tiny_model("llama", tokenizer)
    layers = dict(model.named_modules())
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(RuntimeError, match="int8 would drop what a hook on up_proj computes"):
        with int8_linears(model, torch.device("cpu")):
            pass
    assert dict(model.named_modules()) == layers  # nothing swapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_scales_each_row_on_its_own(dtype):
    """One activation scale per row (per token): a row's product is the same to the bit alone or beside an outlier
    row a thousand times larger, and within int8 rounding of the float product."""
    from peftsum.fast.quantized import int8_product, int8_weight

    torch.manual_seed(0)
    weight = int8_weight(torch.randn(24, 40))
    x = torch.randn(2, 3, 40).to(dtype)
    x[1, 0] *= 1000  # a token with a huge activation
    got = int8_product(x, weight)
    assert got.shape == (2, 3, 24) and got.dtype == dtype
    for i in range(2):
        for j in range(3):
            assert torch.equal(got[i, j], int8_product(x[i, j][None], weight)[0])
    exact = x.float() @ (weight.values.float() * weight.scales[:, None]).T
    error = (got.float() - exact).abs().amax(-1) / exact.abs().amax(-1)
    assert float(error.max()) < 0.03


def test_int8_is_for_the_cpu(tokenizer):
    from peftsum.errors import UserError
    from peftsum.fast.quantized import int8_linears

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


def _sharpened(kind: str, tokenizer):
    model = tiny_model(kind, tokenizer)
    with torch.no_grad():  # as above: logits far enough apart that float noise cannot flip a tie
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("settings", [{}, {"no_repeat_ngram_size": 2}])
@pytest.mark.parametrize("prefill_tokens", [10**6, 1])
def test_the_lean_decoding_step_makes_the_same_tokens_as_generate(settings, prefill_tokens, tokenizer, monkeypatch):
    """decode.py's step in place of the model's forward: rows of different lengths (left padding in the mask), rows
    leaving the batch at EOS, the cache filled in parts."""
    from peftsum.fast.decode import LeanDecoder

    monkeypatch.setattr("peftsum.core.forward.PREFILL_TOKENS", prefill_tokens)
    model = _sharpened("llama", tokenizer)
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts(2)], pad_id=0)
    embeds, mask = model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]
    decoder = LeanDecoder.build(model, torch.float32, rows=len(embeds))
    assert decoder is not None
    with torch.no_grad():
        free = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids={1})
        eos = max({t for row in free for t in row[:MAX_NEW // 2]}, key=lambda t: sum(t in row for row in free))
        expected = hf_tokens(model, embeds, mask, eos=eos, **settings)
        got = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids={eos}, decoder=decoder, **settings)
    assert got == expected
    assert min(len(row) for row in got) < MAX_NEW  # some rows left the batch early


def test_the_lean_int8_path_makes_the_tokens_of_the_models_int8_linears(tokenizer):
    """eval.quantize int8 through decode.py (the joined q/k/v and gate/up weights quantized once) and through the
    model's forward with every linear layer swapped (the path of models decode.py does not cover): per-row weight
    scales and per-token activation scales make the same integer products either way, so the same tokens."""
    from peftsum.fast.decode import LeanDecoder
    from peftsum.fast.quantized import int8_linears

    model = _sharpened("llama", tokenizer)
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in prompts(2)], pad_id=0)
    embeds, mask = model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]
    decoder = LeanDecoder.build(model, torch.float32, rows=len(embeds), int8=True)
    with torch.no_grad():
        lean = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids={1}, decoder=decoder)
        with int8_linears(model, torch.device("cpu")):
            swapped = greedy(model, embeds, mask, max_new_tokens=MAX_NEW, stop_ids={1})
    assert lean == swapped and all(lean)


def _prompt_batch(padded: bool):
    from peftsum.core.forward import positions

    rows = prompts(3)[:4] if padded else [p[:3] for p in prompts(3)[:4]]  # the shortest has 3 tokens
    batch = collate([Encoded(p, [IGNORE] * len(p)) for p in rows], pad_id=0)
    assert bool((batch["attention_mask"] == 0).any()) == padded
    return batch["input_ids"], batch["attention_mask"], positions(batch["attention_mask"])


def _assert_same_cache(mine, theirs, mask, dtype):
    """The same keys and values at the positions `mask` covers (a padding position's are never read, and the two
    paths let it attend differently): in bf16 to the bit once in the compute dtype (the lean path stores keys in
    it, transformers leaves them fp32 where the residual stream is fp32: SDPA casts them alike); in fp32 to rounding
    (oneDNN's packed product rounds the last bits its own way)."""
    real = mask.bool()[:, None, :, None]
    for got_layer, expected_layer in zip(mine.layers, theirs.layers):
        for got, expected in ((got_layer.keys, expected_layer.keys), (got_layer.values, expected_layer.values)):
            got, expected = got.masked_fill(~real, 0), expected.masked_fill(~real, 0)
            if dtype == torch.bfloat16:
                assert torch.equal(got.to(dtype), expected.to(dtype))
            else:
                torch.testing.assert_close(got, expected)


# (compute dtype, stored dtype): fp32; bf16 frozen weights under autocast (untouched, LoRA merged); fp32 weights
# under bf16 autocast (a fine-tuned block's), whose fp32 residual stream makes transformers' keys fp32.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtype, stored", DTYPES)
@pytest.mark.parametrize("padded", [True, False])
def test_the_lean_step_computes_the_models_logits(dtype, stored, padded, tokenizer):
    """One decoding step after the prompts: the model's forward and the lean step, from equal caches, give the same
    logits (fp32: to float rounding; bf16 under autocast, padded batch: to the bit, the same products in the same
    dtype; bf16 without padding: transformers then calls SDPA's GQA kernel, which rounds differently, decode.py)
    and write the same keys and values."""
    import copy

    from peftsum.core.forward import ReservedLayer, autocast, filled_cache
    from peftsum.fast.decode import LeanDecoder
    from peftsum.methods.base import untouched

    model = tiny_model("llama", tokenizer)
    untouched(model, stored)
    ids, mask, position_ids = _prompt_batch(padded)
    tolerance = 1e-5 if dtype == torch.float32 else 0.0 if padded else 1e-2
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        cache = filled_cache(model.config, [], lambda: ReservedLayer(4))
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        twin = copy.deepcopy(cache)
        tokens, step_mask = torch.tensor([5, 6, 7, 8]), torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
        position = position_ids[:, -1] + 1
        expected = model(input_ids=tokens[:, None], attention_mask=step_mask, position_ids=position[:, None],
                         past_key_values=cache, use_cache=True).logits[:, -1].float()
        got = LeanDecoder.build(model, dtype, rows=4)(tokens, step_mask, position, twin)
    assert float((got - expected).abs().max()) <= tolerance * float(expected.abs().max())
    _assert_same_cache(twin, cache, step_mask, dtype)


@pytest.mark.parametrize("dtype, stored", DTYPES)
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("prefix", [False, True])
def test_the_lean_prefill_computes_the_models_logits(dtype, stored, padded, prefix, tokenizer):
    """The prompts through the lean path and through the model's forward, into empty caches or caches holding a
    key/value prefix (prefix tuning's): the same last-position logits (bf16: to the bit) and the same cache."""
    from peftsum.core.forward import ReservedLayer, autocast, filled_cache
    from peftsum.fast.decode import LeanDecoder
    from peftsum.methods.base import untouched
    from peftsum.methods.prefix.method import kv_layout

    model = tiny_model("llama", tokenizer)
    untouched(model, stored)
    ids, mask, position_ids = _prompt_batch(padded)
    held = []
    if prefix:  # two positions per layer, in front of the prompt and covered by the mask
        layers, kv_heads, head_dim = kv_layout(model.config)
        generator, shape = torch.Generator().manual_seed(5), (4, kv_heads, 2, head_dim)
        held = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
                for _ in range(layers)]
        mask = torch.cat([torch.ones(4, 2, dtype=torch.long), mask], 1)
        position_ids = position_ids + 2
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        cache = filled_cache(model.config, held, lambda: ReservedLayer(4))
        expected = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        twin = filled_cache(model.config, held, lambda: ReservedLayer(4))
        got = LeanDecoder.build(model, dtype, rows=4).prefill(embeds, mask, position_ids, twin)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    _assert_same_cache(twin, cache, mask, dtype)
    if not prefix:  # keys held in the compute dtype, which SDPA reads without a cast at every decoding step
        assert {layer.keys.dtype for layer in twin.layers} == {dtype}


def test_the_lean_step_is_used_only_where_it_is_exact(tokenizer):
    from torch import nn

    from peftsum.config import RunConfig
    from peftsum.fast.decode import LeanDecoder
    from peftsum.fast.quantized import int8_linears
    from peftsum.methods.base import adapt, untouched

    build = LeanDecoder.build
    assert build(tiny_model("gpt2", tokenizer), torch.float32, 4) is None
    assert build(tiny_model("gemma3", tokenizer), torch.float32, 4) is None
    llama = tiny_model("llama", tokenizer)
    assert build(llama, torch.float32, 4) is not None
    with int8_linears(llama, torch.device("cpu")):
        assert build(llama, torch.float32, 4) is None
    half = tiny_model("llama", tokenizer)
    untouched(half, torch.bfloat16)
    assert build(half, torch.float32, 4) is None  # without autocast, bf16 weights compute in bf16: not one dtype
    assert build(half, torch.bfloat16, 4) is not None
    cfg = RunConfig()
    cfg.model.precision = "fp32"
    for method in ("lora", "ia3"):  # their hooks: in the way until merged, inert after
        adapted = adapt(tiny_model("llama", tokenizer), tokenizer, method, cfg)
        assert build(adapted.model, torch.float32, 4) is None
        with adapted.for_generation():
            assert build(adapted.model, torch.float32, 4) is not None
    hooked = tiny_model("llama", tokenizer)
    hooked.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, args, output: output * 2)
    assert build(hooked, torch.float32, 4) is None
    biased = tiny_model("llama", tokenizer)
    biased.model.layers[0].self_attn.q_proj = nn.Linear(32, 32, bias=True)
    assert build(biased, torch.float32, 4) is None


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "finetune"])
def test_evaluation_generates_the_same_summaries_with_the_lean_step(method, tokenizer, monkeypatch):
    """generate_from builds the lean step for the model as it generates (LoRA merged; a soft prompt in the prefill;
    a key/value prefix in the cache) and makes the summaries the model's own forward makes."""
    import peftsum.fast.decode
    from peftsum.config import RunConfig
    from peftsum.evaluation.evaluate import generate_from
    from peftsum.methods.base import adapt

    cfg = RunConfig()
    cfg.model.precision = "fp32"
    cfg.eval.max_new_tokens, cfg.eval.batch_size = MAX_NEW, 4
    adapted = adapt(_sharpened("llama", tokenizer), tokenizer, method, cfg)
    torch.manual_seed(1)
    for p in adapted.trainable:
        p.data.add_(torch.randn_like(p) * 0.3)
    texts = [tokenizer.decode(p) for p in prompts(4)]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    built = []
    real = peftsum.fast.decode.LeanDecoder.build.__func__
    monkeypatch.setattr(peftsum.fast.decode.LeanDecoder, "build",
                        classmethod(lambda cls, *a: built.append(real(cls, *a)) or built[-1]))
    args = (adapted, tokenizer, encoded, cfg.eval, (tokenizer.eos_token_id,), torch.device("cpu"), torch.float32)
    lean = generate_from(*args)
    monkeypatch.setattr(peftsum.fast.decode.LeanDecoder, "build", classmethod(lambda cls, *a: None))
    assert built and built[0] is not None
    assert any(lean) and lean == generate_from(*args)


@pytest.mark.parametrize("kind, lean", [("llama", True), ("gpt2", False)])
def test_evaluation_generates_with_int8_products_where_asked(kind, lean, tokenizer, monkeypatch):
    """eval.quantize int8: generate_from multiplies in int8 through decode.py where it covers the model, else
    through the model with its linear layers swapped, which it gets back afterwards."""
    import peftsum.fast.decode
    from peftsum.config import RunConfig
    from peftsum.evaluation.evaluate import generate_from
    from peftsum.methods.base import untouched

    cfg = RunConfig()
    cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.quantize = 4, 4, "int8"
    model = _sharpened(kind, tokenizer)
    adapted = untouched(model, torch.float32)
    layers = dict(model.named_modules())
    built, products = [], []
    real_build, real_int_mm = peftsum.fast.decode.LeanDecoder.build.__func__, torch._int_mm
    monkeypatch.setattr(peftsum.fast.decode.LeanDecoder, "build",
                        classmethod(lambda cls, *a: built.append((real_build(cls, *a), a[-1])) or built[-1][0]))
    monkeypatch.setattr(torch, "_int_mm", lambda *a: products.append(1) or real_int_mm(*a))
    encoded = [tokenizer(tokenizer.decode(p))["input_ids"] for p in prompts(5)]
    texts = generate_from(adapted, tokenizer, encoded, cfg.eval, (tokenizer.eos_token_id,), torch.device("cpu"),
                          torch.float32)
    assert len(texts) == len(encoded) and products
    assert built == [(built[0][0], True)] and (built[0][0] is not None) == lean
    assert dict(model.named_modules()) == layers  # every layer back in place
