import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftsum.config import DataConfig
from peftsum.core.data import Example, load_data, load_split
from peftsum.core.prompts import IGNORE, encode_example, encode_prompt, prompt_budget
from peftsum.errors import UserError


def test_only_summary_tokens_and_eos_carry_loss(tokenizer):
    cfg = DataConfig(max_length=64, max_summary_tokens=16)
    enc = encode_example(tokenizer, Example("1", "the council said on monday", "new rules"), cfg)
    summary = tokenizer(" new rules", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in enc.labels if t != IGNORE] == summary
    assert enc.input_ids[-len(summary):] == summary
    assert all(label == IGNORE for label in enc.labels[: enc.prompt_length])


def test_long_document_is_truncated_never_the_summary(tokenizer):
    cfg = DataConfig(max_length=40, max_summary_tokens=20)
    document = " ".join(["council"] * 500)
    summary = "new rules for city buses"
    enc = encode_example(tokenizer, Example("1", document, summary), cfg, reserved=5)
    assert len(enc.input_ids) <= 40 - 5
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE], skip_special_tokens=True).strip() == summary
    assert enc.input_ids[: enc.prompt_length][-len(tokenizer("\nTL;DR:")["input_ids"]):] == tokenizer("\nTL;DR:")["input_ids"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.text(min_size=1, max_size=400), summary=st.text(min_size=1, max_size=120),
       max_length=st.integers(24, 128), cap=st.integers(1, 20), reserved=st.integers(0, 3))
def test_every_example_fits_and_labels_align(tokenizer, document, summary, max_length, cap, reserved):
    cfg = DataConfig(max_length=max_length, max_summary_tokens=cap)
    template_tokens = len(tokenizer("\nTL;DR:", add_special_tokens=False)["input_ids"])
    summary_tokens = min(cap, len(tokenizer(" " + summary, add_special_tokens=False)["input_ids"])) + 1
    if template_tokens + summary_tokens + reserved >= max_length:  # no room for a single document token
        with pytest.raises(UserError, match="leaving no room for the document"):
            encode_example(tokenizer, Example("x", document, summary), cfg, reserved=reserved)
        return
    enc = encode_example(tokenizer, Example("x", document, summary), cfg, reserved=reserved)
    assert len(enc.input_ids) == len(enc.labels) <= max_length - reserved
    full_summary = tokenizer(" " + summary, add_special_tokens=False)["input_ids"]
    kept = [t for t in enc.labels if t != IGNORE]
    assert kept[-1] == tokenizer.eos_token_id
    assert kept[:-1] == full_summary[:cap]  # cut only by its own cap
    assert all(a == b for a, b in zip(enc.input_ids[enc.prompt_length:], kept))
    # The generation prompt fits the budget training gave it with the summary at its cap.
    budget = prompt_budget(cfg, reserved)
    if budget > template_tokens:
        assert len(encode_prompt(tokenizer, document, cfg.template, budget)) <= budget


def test_local_folder_columns_are_inferred_and_subsets_are_seeded(tiny_data):
    cfg = DataConfig(source=str(tiny_data), train_size=10, train_eval_size=4, eval_size=5)
    a, b = load_data(cfg, seed=1), load_data(cfg, seed=1)
    c = load_data(cfg, seed=2)
    assert [e.id for e in a.train] == [e.id for e in b.train] != [e.id for e in c.train]
    assert len(a.train) == 10 and a.train_eval == a.train[:4] and len(a.eval) == 5
    assert a.info["document_column"] == "document" and a.info["summary_column"] == "summary"


def test_unknown_column_lists_the_available_ones(tiny_data):
    with pytest.raises(UserError, match=r"no column 'body'; available: id, document, summary"):
        load_split(DataConfig(source=str(tiny_data), document_column="body"), "train")


def test_empty_rows_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    rows = [{"article": "text one", "highlights": "one"}, {"article": "  ", "highlights": "x"},
            {"article": "text three", "highlights": ""}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, info = load_split(DataConfig(source=str(folder)), "train")
    assert [e.document for e in examples] == ["text one"] and info["skipped"] == 2


def test_malformed_jsonl_names_file_and_line(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"document": "a", "summary": "b"}\n{"document": \n')
    with pytest.raises(UserError, match=r"train.jsonl: line 2 is not valid JSON"):
        load_split(DataConfig(source=str(folder)), "train")


def test_csv_and_too_small_data(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.csv").write_text("dialogue,summary\nhello there,greeting\n")
    (folder / "validation.csv").write_text("dialogue,summary\nbye now,farewell\n")
    splits = load_data(DataConfig(source=str(folder), train_eval_size=1, eval_size=1), seed=0)
    assert splits.train[0].summary == "greeting"
    with pytest.raises(UserError, match="asked for 5 examples but the split has 1"):
        load_data(DataConfig(source=str(folder), train_size=5, train_eval_size=1, eval_size=1), seed=0)
