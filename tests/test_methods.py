"""The methods on tiny random-init models (GPT-2, Llama, Gemma 3), and the reference study's parameter counts on
GPT-2 small."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import KINDS, tiny_model

from peftsum.config import RunConfig
from peftsum.core.forward import collate, generate_batch, summary_loss
from peftsum.core.prompts import IGNORE, Encoded
from peftsum.errors import UserError
from peftsum.methods.base import adapt, unhooked, untouched
from peftsum.methods.lora import method as lora
from peftsum.methods.registry import NAMES, method_named, settings_class


def batch_for(tokenizer, texts, summary_from=3):
    """Encoded examples whose last tokens (from position `summary_from`) are labelled."""
    encoded = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        encoded.append(Encoded(ids, [IGNORE] * summary_from + ids[summary_from:]))
    return collate(encoded, tokenizer.pad_token_id)


def fp32_config() -> RunConfig:
    """Exact comparisons need the frozen weights kept in fp32 (by default they are stored in bf16 where supported)."""
    cfg = RunConfig()
    cfg.model.precision = "fp32"
    return cfg


def logits(model, batch):
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions).logits


def test_reference_study_parameter_counts_on_gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config())
    cfg = RunConfig()
    cfg.lora.targets = ["attn.c_attn", "attn.c_proj"]
    cfg.prompt.num_virtual_tokens, cfg.prompt.init = 10, "random"
    counts = {m: adapt(copy.deepcopy(base), None, m, cfg).parameter_counts() for m in ("lora", "prompt", "finetune")}
    assert (counts["lora"]["trainable"], counts["lora"]["total"]) == (442_368, 124_882_176)
    assert (counts["prompt"]["trainable"], counts["prompt"]["total"]) == (7_680, 124_447_488)
    assert (counts["finetune"]["trainable"], counts["finetune"]["total"]) == (38_597_376, 124_439_808)
    assert "tied to the input embeddings" in counts["finetune"]["description"]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_starts_as_the_base_model_and_merge_round_trips(kind, tokenizer):
    base = tiny_model(kind, tokenizer)
    batch = batch_for(tokenizer, ["the council said on monday", "new rules"])
    expected = logits(base, batch)
    adapted = adapt(copy.deepcopy(base), tokenizer, "lora", fp32_config())
    adapted.model.eval()
    assert torch.equal(logits(adapted.model, batch), expected)  # B = 0
    torch.manual_seed(1)
    for p in adapted.trainable:
        p.data.normal_(0, 0.1)
    hooked = logits(adapted.model, batch)
    assert (hooked - expected).abs().max() > 1e-3
    weights = {n: p.clone() for n, p in adapted.model.named_parameters() if "lora" not in n}
    lora.merge(adapted.model)
    assert torch.allclose(logits(adapted.model, batch), hooked, atol=1e-5)
    lora.unmerge(adapted.model)
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in adapted.model.named_parameters() if "lora" not in n)


def test_the_registry_finds_each_method_and_its_settings_by_name():
    for name in NAMES:
        assert method_named(name).name == name
        assert type(getattr(RunConfig(), name)) is settings_class(name)
    with pytest.raises(UserError, match="unknown method 'adapterx'; choose from lora, prompt, finetune"):
        method_named("adapterx")


def test_a_layer_is_unhooked_once_what_the_method_attached_is_merged(tokenizer):
    adapted = adapt(tiny_model("llama", tokenizer), tokenizer, "lora", fp32_config())
    layers = [adapted.model.get_submodule(name) for name in lora.modules(adapted.model)]
    assert layers and not any(unhooked(layer) for layer in layers)
    lora.merge(adapted.model)
    assert all(unhooked(layer) for layer in layers)
    assert any(part in key for key in adapted.model.state_dict() for part in adapted.method.attached_keys)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_method_parameters_train(kind, tokenizer):
    cfg = fp32_config()
    cfg.finetune.head, cfg.finetune.last_blocks = False, 1
    for method in ("lora", "prompt", "finetune"):
        adapted = adapt(tiny_model(kind, tokenizer), tokenizer, method, cfg)
        trainable = {id(p) for p in adapted.trainable}
        grads = [p for p in adapted.model.parameters() if p.requires_grad]
        assert {id(p) for p in grads} <= trainable and trainable
        loss, _ = summary_loss(adapted, batch_for(tokenizer, ["the council said on monday that new rules"]))
        loss.backward()
        # (LoRA's A gets no gradient at the first step, since B starts at zero; B does.)
        assert all(p.grad is not None for p in adapted.trainable)
        assert any(p.grad.abs().sum() > 0 for p in adapted.trainable)
        assert all(p.grad is None for p in adapted.model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_summary_loss_covers_labelled_tokens_only(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    batch = batch_for(tokenizer, ["the council said on monday that", "new rules for city buses will start"], 4)
    loss_sum, count = summary_loss(untouched(model), batch)
    full = logits(model, batch)[:, :-1]
    targets = batch["labels"][:, 1:]
    reference = F.cross_entropy(full.reshape(-1, full.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")
    assert count == int((targets != IGNORE).sum())
    assert torch.allclose(loss_sum, reference, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_soft_prompt_changes_loss_and_generation(kind, tokenizer):
    base = tiny_model(kind, tokenizer)
    cfg = fp32_config()
    cfg.prompt.init = "random"
    batch = batch_for(tokenizer, ["the council said on monday that", "new rules"])
    prompts = [tokenizer("the council said")["input_ids"], tokenizer("new rules for city buses")["input_ids"]]
    kwargs = dict(max_new_tokens=6, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0,
                  stop_ids=(tokenizer.eos_token_id,))
    plain = untouched(copy.deepcopy(base))
    prompted = adapt(copy.deepcopy(base), tokenizer, "prompt", cfg)
    with torch.no_grad():
        prompted.prompt_encoder.embeddings.mul_(50)  # random tiny-model outputs are flat; make the prompt matter
    assert not torch.allclose(summary_loss(plain, batch)[0], summary_loss(prompted, batch)[0])
    assert generate_batch(plain, tokenizer, prompts, **kwargs) != generate_batch(prompted, tokenizer, prompts, **kwargs)


def test_soft_prompt_sits_right_before_the_real_tokens():
    from peftsum.methods.prompt.method import SoftPrompt

    prompt = SoftPrompt(torch.full((2, 1), 9.0))
    embeds = torch.tensor([[[0.0], [0.0], [1.0], [2.0]], [[3.0], [4.0], [5.0], [6.0]]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 1, 2], [3, 4, 5, 6]])
    new_embeds, new_mask, new_labels = prompt.insert(embeds, mask, labels)
    assert new_embeds[..., 0].tolist() == [[0, 0, 9, 9, 1, 2], [9, 9, 3, 4, 5, 6]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, -100, -100, -100, 1, 2], [-100, -100, 3, 4, 5, 6]]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_one_at_a_time(kind, tokenizer):
    """Left padding must not change what any method generates (the soft prompt included)."""
    base = tiny_model(kind, tokenizer)
    prompts = [tokenizer("the council said")["input_ids"], tokenizer("new rules for city buses will start")["input_ids"]]
    kwargs = dict(max_new_tokens=5, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0,
                  stop_ids=(tokenizer.eos_token_id,))
    for method in ("lora", "prompt"):
        adapted = adapt(copy.deepcopy(base), tokenizer, method, fp32_config())
        torch.manual_seed(2)
        for p in adapted.trainable:
            p.data.normal_(0, 0.5)
        with adapted.for_generation():
            batched = generate_batch(adapted, tokenizer, prompts, **kwargs)
            alone = [generate_batch(adapted, tokenizer, [p], **kwargs)[0] for p in prompts]
        assert batched == alone


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "prompt", "finetune"])
def test_bf16_frozen_weights_train_every_method(kind, method, tokenizer):
    """Frozen weights stored in bf16 next to fp32 trainable ones (a trainable tied embedding, trainable norms)."""
    from peftsum.core.forward import autocast

    cfg = RunConfig()
    cfg.model.precision = "bf16"
    cfg.finetune.head, cfg.finetune.last_blocks = True, 1
    adapted = adapt(tiny_model(kind, tokenizer), tokenizer, method, cfg)
    assert adapted.frozen_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapted.trainable)
    assert any(p.dtype == torch.bfloat16 for p in adapted.model.parameters() if not p.requires_grad)
    with autocast(torch.device("cpu"), torch.bfloat16):
        loss, count = summary_loss(adapted, batch_for(tokenizer, ["the council said on monday that new rules"]))
    (loss / count).backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.trainable)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["ia3", "prefix", "ptuning"])
def test_newer_methods_train_and_generate_on_every_architecture(kind, method, tokenizer):
    """IA3, prefix tuning and P-tuning on each tiny architecture (Gemma 3's sliding-window cache included): gradients
    reach every trainable tensor, and a left-padded batch generates what each prompt generates alone. Prefix tuning
    refuses Gemma 3 (sliding-window layers) in one line."""
    from peftsum.errors import UserError

    if (kind, method) == ("gemma3", "prefix"):
        with pytest.raises(UserError, match="sliding-window"):
            adapt(tiny_model(kind, tokenizer), tokenizer, method, fp32_config())
        return
    adapted = adapt(tiny_model(kind, tokenizer), tokenizer, method, fp32_config())
    torch.manual_seed(2)
    for p in adapted.trainable:
        p.data.add_(torch.randn_like(p) * 0.5)  # away from the start (IA3's ones), so the method changes outputs
    loss, count = summary_loss(adapted, batch_for(tokenizer, ["the council said on monday that new rules", "buses"]))
    (loss / count).backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.trainable)
    prompts = [tokenizer("the council said")["input_ids"], tokenizer("new rules for city buses will start")["input_ids"]]
    kwargs = dict(max_new_tokens=5, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0,
                  stop_ids=(tokenizer.eos_token_id,))
    adapted.model.eval()
    with torch.no_grad(), adapted.for_generation():
        batched = generate_batch(adapted, tokenizer, prompts, **kwargs)
        alone = [generate_batch(adapted, tokenizer, [p], **kwargs)[0] for p in prompts]
    assert batched == alone


def test_length_grouped_batches_cover_every_example_once_and_pad_less():
    import random

    from peftsum.training.train import epoch_batches

    lengths = [random.Random(i).randint(10, 300) for i in range(200)]
    batches = epoch_batches(lengths, 8, seed=0, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == epoch_batches(lengths, 8, seed=0, epoch=1) != epoch_batches(lengths, 8, seed=0, epoch=2)
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = epoch_batches(lengths, 8, seed=0, epoch=1, group=1)  # group of one batch: no sorting
    padding_plain = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in shuffled)
    assert padding < padding_plain / 3


def test_bf16_generation_with_a_trainable_tied_embedding(tokenizer):
    """GPT-2 ties its head to the embeddings: generate() embeds new tokens with the fp32 trainable table."""
    cfg = RunConfig()
    cfg.model.precision = "bf16"
    adapted = adapt(tiny_model("gpt2", tokenizer), tokenizer, "finetune", cfg)
    kwargs = dict(max_new_tokens=4, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0,
                  stop_ids=(tokenizer.eos_token_id,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        texts = generate_batch(adapted, tokenizer, [tokenizer("the council said")["input_ids"]], **kwargs)
    assert len(texts) == 1 and isinstance(texts[0], str)


# ---------------------------------------------------------------- Gemma 3: scaled embeddings, tied head, logit cap


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", ["text", "vocab", "random"])
def test_soft_prompt_starts_at_the_scale_of_the_embedding_output(kind, init, tokenizer):
    """Gemma multiplies its table by sqrt(hidden size); the prompt must start beside real token embeddings, not raw
    rows. For GPT-2 and Llama (plain nn.Embedding) the output is the row itself, so nothing changes there."""
    from peftsum.methods.prompt.method import initial_embeddings

    model = tiny_model(kind, tokenizer)
    module, table = model.get_input_embeddings(), model.get_input_embeddings().weight.detach()
    cfg = fp32_config().prompt
    cfg.init, cfg.num_virtual_tokens = init, 7
    got = initial_embeddings(model, tokenizer, cfg, torch.Generator().manual_seed(0))
    scale = model.config.hidden_size ** 0.5 if kind == "gemma3" else 1.0
    if init == "random":
        raw_std = float(table.std())
        same = initial_embeddings(model, tokenizer, cfg, torch.Generator().manual_seed(0))
        assert torch.equal(got, same)  # seeded
        noise = torch.randn(7, table.shape[1], generator=torch.Generator().manual_seed(0))
        assert torch.allclose(got, noise * raw_std * scale, rtol=1e-4)
        return
    if init == "text":
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        ids = (ids * 7)[:7]
    else:
        ids = torch.randint(0, min(len(table), 5000), (7,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        assert torch.equal(got, module(torch.tensor(ids)))
    if kind == "gemma3":
        assert torch.allclose(got, table[ids] * scale, rtol=1e-6)
    else:
        assert torch.equal(got, table[ids])  # unchanged for plain embeddings: the raw rows


def test_gemma_head_is_tied_and_its_size_is_stated(tokenizer):
    from peftsum.core.models import ties_embeddings

    model = tiny_model("gemma3", tokenizer)
    assert ties_embeddings(model)
    adapted = adapt(model, tokenizer, "finetune", fp32_config())
    vocab, hidden = len(tokenizer), model.config.hidden_size
    counts = adapted.parameter_counts()
    assert counts["trainable"] == vocab * hidden  # the one shared table, counted once
    assert f"tied to the input embeddings: {vocab:,} x {hidden:,} = {vocab * hidden:,} parameters" in \
        counts["description"]


def test_summary_loss_applies_the_models_logit_cap(tokenizer):
    """Gemma 2-style final_logit_softcapping: the chunked head loss caps the logits as the model's forward does."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("gemma3", len(tokenizer))
    config.final_logit_softcapping = 0.5  # far below the logits of a sharpened head: the cap changes the loss
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    batch = batch_for(tokenizer, ["the council said on monday that", "new rules for city buses will start"], 4)
    loss_sum, _ = summary_loss(untouched(model), batch)
    full = logits(model, batch)[:, :-1]
    assert full.abs().max() <= 0.5
    targets = batch["labels"][:, 1:]
    reference = F.cross_entropy(full.reshape(-1, full.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")
    assert torch.allclose(loss_sum, reference, atol=1e-4)
