"""Prompt formats (prompts.py): the chat format's tokens are apply_chat_template's, truncation cuts the document
alone, labels cover the summary and its end of turn, generation stops at the end of turn; plain stays what it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, WORDS, make_chat_tokenizer, requires_real, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftsum.config import DataConfig, EvalConfig, load_config
from peftsum.core.data import Example
from peftsum.core.prompts import (
    IGNORE,
    ChatFormat,
    PlainFormat,
    encode_example,
    encode_prompt,
    encode_summary,
    prompt_format,
)
from peftsum.errors import UserError
from peftsum.evaluation.evaluate import generate
from peftsum.methods.base import untouched

DOCUMENTS = ["the council said on monday that new rules for city buses will start next year.",
             "  drivers and riders asked for more routes\n\nand cheaper fares!  ", "a"]
SUMMARIES = ["new rules for buses", "riders want cheaper fares.", "x"]


def _messages(fmt: ChatFormat, document: str, summary: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": fmt.system}] if fmt.system else []
    messages.append({"role": "user", "content": f"{fmt.instruction}\n\n{document.strip()}"})
    if summary is not None:
        messages.append({"role": "assistant", "content": summary})
    return messages


def _chat_tokens(tokenizer, messages, generation_prompt: bool) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)["input_ids"]


@pytest.mark.parametrize("system", [None, "You write short summaries."])
def test_chat_tokens_are_apply_chat_templates(chat_tokenizer, system):
    fmt = ChatFormat(chat_tokenizer, "Summarize this text.", system)
    end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fmt.end_of_turn == [end] and fmt.stop_ids == (chat_tokenizer.eos_token_id, end) and end != 1
    for document, summary in zip(DOCUMENTS, SUMMARIES):
        prompt, target = fmt.prompt(document, 10 ** 6), fmt.target(summary, 10 ** 6)
        assert prompt == _chat_tokens(chat_tokenizer, _messages(fmt, document), generation_prompt=True)
        full = _chat_tokens(chat_tokenizer, _messages(fmt, document, summary), generation_prompt=False)
        # The conversation is the prompt, the summary and its end of turn, then only the template's line break.
        assert full[:len(prompt) + len(target)] == prompt + target and target[-1] == end
        assert chat_tokenizer.decode(full[len(prompt) + len(target):]) == "\n"


@requires_real
def test_embedded_models_chat_tokens_are_apply_chat_templates():
    from transformers import AutoTokenizer

    from peftsum.core.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    cfg = DataConfig(source=str(SHARED_DATA / "cnn_dailymail"))
    fmt = prompt_format(tokenizer, cfg)  # auto: SmolLM2 has a chat template
    assert isinstance(fmt, ChatFormat) and fmt.instruction == "Summarize this article in three short sentences."
    assert tokenizer.decode(fmt.end_of_turn) == "<|im_end|>"
    rows = [json.loads(line) for line in (SHARED_DATA / "cnn_dailymail" / "validation.jsonl").open()][:10]
    for row in rows:
        prompt, target = fmt.prompt(row["article"], 10 ** 6), fmt.target(row["highlights"], 10 ** 6)
        assert prompt == _chat_tokens(tokenizer, _messages(fmt, row["article"]), generation_prompt=True)
        full = _chat_tokens(tokenizer, _messages(fmt, row["article"], row["highlights"]), generation_prompt=False)
        assert full[:len(prompt) + len(target)] == prompt + target


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=300), summary=st.text(min_size=1, max_size=80),
       max_length=st.integers(40, 160), cap=st.integers(1, 20), reserved=st.integers(0, 3))
def test_chat_truncation_cuts_only_the_document(chat_tokenizer, words, summary, max_length, cap, reserved):
    fmt = ChatFormat(chat_tokenizer, "Summarize this text.", None)
    cfg = DataConfig(max_length=max_length, max_summary_tokens=cap)
    document = " ".join(words)
    full_prompt = fmt.prompt(document, 10 ** 6)
    head = _chat_tokens(chat_tokenizer, [{"role": "user", "content": "Summarize this text.\n\n"}], False)[:-2]
    tail = chat_tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert full_prompt[:len(head)] == head and full_prompt[-len(tail):] == tail
    target = fmt.target(summary, cap)
    if len(head) + len(tail) + len(target) + reserved >= max_length:
        with pytest.raises(UserError, match="leaving no room for the document"):
            fmt.example(Example("x", document, summary), cfg, reserved)
        return
    encoded = fmt.example(Example("x", document, summary), cfg, reserved)
    assert len(encoded.input_ids) == len(encoded.labels) <= max_length - reserved
    prompt = encoded.input_ids[:encoded.prompt_length]
    # The template is whole on both sides; what is left of the document is its beginning.
    assert prompt[:len(head)] == head and prompt[-len(tail):] == tail
    kept = prompt[len(head):-len(tail)]
    assert kept == full_prompt[len(head):len(head) + len(kept)] and len(kept) >= 1
    # Labels: the summary (cut only by its cap) and the end of turn, nothing of the prompt.
    labelled = [t for t in encoded.labels if t != IGNORE]
    assert labelled == chat_tokenizer(summary.strip(), add_special_tokens=False)["input_ids"][:cap] + fmt.end_of_turn
    assert encoded.input_ids[encoded.prompt_length:] == labelled
    if fmt.budget(cfg, reserved) > len(head) + len(tail):  # a generation prompt fits what training gave it
        assert len(fmt.prompt(document, fmt.budget(cfg, reserved))) <= fmt.budget(cfg, reserved)


def test_auto_is_plain_without_a_chat_template_and_plain_is_unchanged(tokenizer, chat_tokenizer):
    cfg = DataConfig(max_length=64, max_summary_tokens=16)
    assert isinstance(prompt_format(tokenizer, cfg), PlainFormat)  # the tiny tokenizer has no template
    assert isinstance(prompt_format(chat_tokenizer, cfg), ChatFormat)
    plain = DataConfig(max_length=64, max_summary_tokens=16, format="plain")
    example = Example("1", DOCUMENTS[0], SUMMARIES[0])
    for tok, config in ((tokenizer, cfg), (chat_tokenizer, plain)):
        encoded = encode_example(tok, example, config)
        summary = encode_summary(tok, example.summary, config.template, 16)
        assert encoded.input_ids == encode_prompt(tok, example.document, config.template, 64 - len(summary)) + summary
    with pytest.raises(UserError, match="has no chat template"):
        prompt_format(tokenizer, DataConfig(format="chat"))


def test_templates_peftsum_cannot_follow_are_refused(chat_tokenizer):
    tok = make_chat_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"  # no special end of turn
    with pytest.raises(UserError, match="no special token"):
        ChatFormat(tok, "Summarize.", None)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turn') }}{% endif %}"
                         + chat_tokenizer.chat_template)
    with pytest.raises(UserError, match="refused the prompt.*leave data.system unset"):
        ChatFormat(tok, "Summarize.", "Be brief.")


def test_saved_config_without_a_format_was_plain(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  source: x\n")
    assert load_config(tmp_path / "config.yaml", saved=True).data.format == "plain"  # written before formats
    assert load_config(tmp_path / "config.yaml").data.format == "auto"  # a user's config: today's default


def test_generation_stops_at_the_end_of_turn(chat_tokenizer, monkeypatch):
    """A model that always answers <|im_end|>: the chat format stops after it; EOS alone would not."""
    import peftsum.core.forward

    model = tiny_model("llama", chat_tokenizer)
    end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0  # its logit is the sum of the final hidden state: positive after RMSNorm
        model.model.norm.weight.fill_(1.0)
        model.model.norm.register_forward_hook(lambda module, args, out: out.abs())
    made = []
    original = peftsum.core.forward.greedy
    monkeypatch.setattr(peftsum.core.forward, "greedy", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    eval_cfg = EvalConfig(max_new_tokens=6, no_repeat_ngram_size=0)
    adapted = untouched(model)
    for data_format, length in (("chat", 1), ("plain", 6)):
        texts = generate(adapted, chat_tokenizer, DOCUMENTS[:2], DataConfig(format=data_format), eval_cfg,
                         torch.device("cpu"), torch.float32)
        assert texts == ["", ""]  # the end of turn is a special token: never in the text
        assert [len(row) for row in made[-1]] == [length, length] and made[-1][0][0] == end
