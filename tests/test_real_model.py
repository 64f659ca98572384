"""Slow tests on the real embedded SmolLM2-135M and ../shared/data (skipped where either is absent; CI has both)."""

import dataclasses

import pytest
import torch
from conftest import SHARED_DATA, requires_real

from peftsum.config import load_config
from peftsum.core.data import load_data
from peftsum.core.prompts import encode_example
from peftsum.core.session import fresh_adapted, open_session
from peftsum.evaluation.evaluate import evaluate, mean_loss
from peftsum.methods.base import untouched
from peftsum.training.train import TrainEnv, train

pytestmark = [pytest.mark.slow, requires_real]


BASE_SETTINGS = {"data.source": str(SHARED_DATA / "xsum"), "data.max_length": "256", "data.max_summary_tokens": "48",
                 "eval.max_new_tokens": "48", "eval.bootstrap_samples": "200"}


def config_for(overrides):
    return load_config(None, {**BASE_SETTINGS, **overrides})


def session_for(overrides):
    cfg = config_for(overrides)
    return cfg, open_session(cfg, progress=False)


def train_briefly(session, method, splits):
    adapted = fresh_adapted(session, method)
    cfg = session.cfg
    encoded = [encode_example(session.loaded.tokenizer, e, cfg.data, adapted.virtual_tokens) for e in splits.train]
    env = TrainEnv(session.device, session.dtype, session.loaded.tokenizer.pad_token_id, progress=False)
    stats = train(adapted, encoded, cfg.train, cfg.method_lr(method), env)
    return adapted, stats


def test_embedded_model_loads_from_the_cache_quickly():
    import time

    from peftsum.core.models import embedded_model_dir

    embedded_model_dir("smollm2-135m")  # converts once if this machine has not yet
    started = time.perf_counter()
    cfg, session = session_for({})
    assert time.perf_counter() - started < 10
    assert session.loaded.model.config.model_type == "llama"
    assert sum(p.numel() for p in session.loaded.model.parameters()) == 134_515_008


LOSS_SETTINGS = {"data.train_size": "48", "data.train_eval_size": "0", "data.eval_size": "24", "train.batch_size": "8",
                 "data.max_length": "128"}


@pytest.fixture(scope="module")
def xsum_loss_before():
    """(cfg, session, splits, the untouched model's validation loss) at LOSS_SETTINGS, shared by the methods' tests:
    one model load and one 'before' for all of them. 128 tokens (an XSum document's first ~70 and its summary) keep
    six steps quick; every method below still lowers the loss by 2.4x the margin or more (measured: LoRA 0.26, DoRA
    0.12, IA3 0.26, prefix 0.14 on the Zen 4 in bf16)."""
    cfg, session = session_for(LOSS_SETTINGS)
    splits = load_data(cfg.data, seed=0)
    before, _ = mean_loss(untouched(session.loaded.model), session.tokenizer, splits.eval, cfg.data, 8,
                          session.device, session.dtype)
    return cfg, session, splits, before


@pytest.mark.parametrize("method, overrides", [("lora", {"lora.lr": "2e-3"}), ("lora", {"lora.variant": "dora"}),
                                               ("ia3", {}), ("prefix", {})], ids=["lora", "dora", "ia3", "prefix"])
def test_methods_lower_the_validation_loss(method, overrides, xsum_loss_before):
    """Six steps on 48 XSum pairs lower the loss on 24 others: LoRA (at a higher learning rate), and DoRA, IA3 and
    prefix tuning at their defaults."""
    cfg, session, splits, before = xsum_loss_before
    method_session = dataclasses.replace(session, cfg=config_for({**LOSS_SETTINGS, **overrides}))
    adapted, stats = train_briefly(method_session, method, splits)
    after, _ = mean_loss(adapted, session.tokenizer, splits.eval, cfg.data, 8, session.device, session.dtype)
    assert stats["steps"] == 6
    assert after < before - 0.05, (before, after)


def test_prompt_tuning_does_not_lower_rouge():
    """The reference study's soft prompt collapsed at generation (far lower ROUGE); ours must not.

    In the reference study's format (plain, "TL;DR:"): the collapse came from where batched generation puts the
    virtual tokens, which this checks. (In the chat format the instruct model's zero-shot is stronger, and 12 steps of
    prompt tuning can end below it; the comparison's verdict against the strongest baseline says so.) Equal ROUGE on
    24 examples differs in the second decimal between CPU kinds (bf16 on AMX, fp32 elsewhere), so "not lower" allows
    one ROUGE point: a collapse costs many points, noise costs hundredths.
    """
    cfg, session = session_for({"data.train_size": "96", "data.train_eval_size": "0", "data.eval_size": "24",
                                "train.batch_size": "8", "data.format": "plain"})
    splits = load_data(cfg.data, seed=0)
    tok = session.loaded.tokenizer
    args = (tok, splits.eval, cfg.data, cfg.eval, session.device, session.dtype)
    before = evaluate(untouched(session.loaded.model), *args)
    adapted, _ = train_briefly(session, "prompt", splits)
    torch.manual_seed(0)
    after = evaluate(adapted, *args)
    rouge1_before, rouge1_after = before["rouge"]["rouge1"]["mean"], after["rouge"]["rouge1"]["mean"]
    assert rouge1_after >= rouge1_before - 1.0, (before["rouge"], after["rouge"])
    assert after["loss"] < before["loss"]


def test_trained_lora_round_trips_through_peft(tmp_path):
    """A briefly trained LoRA on the embedded model, saved by peftsum, loads in HF peft with the same logits."""
    import copy

    import peft

    from peftsum.core.forward import collate
    from peftsum.methods import adapters

    cfg, session = session_for({"data.train_size": "8", "data.train_eval_size": "0", "data.eval_size": "0",
                                "data.max_length": "128", "train.batch_size": "4", "lora.lr": "1e-2",
                                "model.precision": "fp32"})
    base = copy.deepcopy(session.loaded.model)
    splits = load_data(cfg.data, seed=0)
    adapted, stats = train_briefly(session, "lora", splits)
    assert stats["steps"] == 2
    adapters.save(adapted, tmp_path, session.loaded.source, cfg)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    tok = session.loaded.tokenizer
    batch = collate([encode_example(tok, e, cfg.data) for e in splits.train[:2]], tok.pad_token_id)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = adapted.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=positions).logits
        theirs = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=positions).logits
    real = batch["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max() < 1e-4
    with reloaded.disable_adapter(), torch.no_grad():
        plain = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=positions).logits
    assert (ours - plain)[real].abs().max() > 1e-3  # training changed the model, so the match is not trivial


def test_chat_format_zero_shot_beats_plain_on_news():
    """The untouched instruct model, asked through its own chat template, summarizes better than with TL;DR:
    16 CNN/DailyMail validation articles at 384 tokens (the demo's length before it went to 256)."""
    cfg = load_config(None, {"data.source": str(SHARED_DATA / "cnn_dailymail"), "data.eval_size": "16",
                             "data.train_eval_size": "0", "data.max_length": "384", "data.max_summary_tokens": "80",
                             "eval.max_new_tokens": "80", "eval.batch_size": "16", "eval.bootstrap_samples": "200"})
    session = open_session(cfg, progress=False)
    examples = load_data(cfg.data, seed=0).eval
    model = untouched(session.loaded.model, session.dtype)
    scores = {}
    for data_format in ("chat", "plain"):
        cfg.data.format = data_format
        result = evaluate(model, session.tokenizer, examples, cfg.data, cfg.eval, session.device, session.dtype)
        scores[data_format] = result["rouge"]["rouge1"]["mean"]
    assert scores["chat"] > scores["plain"], scores
