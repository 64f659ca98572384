import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peftsum.errors import UserError
from peftsum.evaluation.metrics import (
    ROUGE_KEYS,
    bootstrap_interval,
    format_table,
    paired_bootstrap,
    read_summaries,
    rouge_intervals,
    rouge_per_document,
    rouge_summary,
    split_sentences,
)

# --- ROUGE -------------------------------------------------------------------


def test_identical_texts_score_100():
    text = "The committee approved the budget. Funding starts in March."
    scores = rouge_per_document([text], [text])
    for key in ROUGE_KEYS:
        assert scores[key] == [pytest.approx(100.0)]


def test_disjoint_texts_score_0():
    scores = rouge_per_document(["alpha beta gamma"], ["delta epsilon zeta"])
    for key in ROUGE_KEYS:
        assert scores[key] == [0.0]


def test_hand_computed_rouge1():
    # prediction tokens: the cat sat (3); reference: the cat sat on the mat (6).
    # Overlap 3 -> P = 3/3 = 1, R = 3/6 = 0.5, F1 = 2*1*0.5/1.5 = 2/3 -> 66.67.
    # rouge2: bigrams "the cat", "cat sat" both match -> P = 1, R = 2/5, F1 = 4/7 -> 57.14.
    scores = rouge_per_document(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"][0] == pytest.approx(200 / 3)
    assert scores["rouge2"][0] == pytest.approx(400 / 7)


def test_rougelsum_splits_sentences():
    # Same two sentences in swapped order: the whole-text LCS covers only one
    # sentence (4 of 8 tokens -> 50), but summary-level LCS matches each
    # reference sentence against every predicted sentence -> 100.
    prediction = "The dog ran away. The cat sat down."
    reference = "The cat sat down. The dog ran away."
    scores = rouge_per_document([prediction], [reference])
    assert scores["rougeL"][0] == pytest.approx(50.0)
    assert scores["rougeLsum"][0] == pytest.approx(100.0)


def test_rouge_never_calls_nltk_sentence_tokenizer(monkeypatch):
    import nltk

    def forbidden(*args, **kwargs):
        raise AssertionError("nltk.sent_tokenize needs punkt, which is not available offline")

    monkeypatch.setattr(nltk, "sent_tokenize", forbidden)
    scores = rouge_per_document(["One sentence. Two sentences."], ["One sentence here. Another."])
    assert 0 < scores["rougeLsum"][0] < 100


def test_multi_reference_takes_best():
    prediction = "the cat sat on the mat"
    single = rouge_per_document([prediction], ["a dog barked loudly"])
    multi = rouge_per_document([prediction], [["a dog barked loudly", "the cat sat on the mat"]])
    reversed_order = rouge_per_document([prediction], [["the cat sat on the mat", "a dog barked loudly"]])
    assert single["rouge1"][0] == 0.0
    for key in ROUGE_KEYS:
        assert multi[key][0] == pytest.approx(100.0)
        assert reversed_order[key][0] == pytest.approx(100.0)


def test_empty_prediction_scores_zero():
    scores = rouge_per_document(["", "   "], ["the cat sat", "the cat sat"])
    for key in ROUGE_KEYS:
        assert scores[key] == [0.0, 0.0]


def test_length_mismatch_and_empty_reference_list_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_per_document(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty list of references"):
        rouge_per_document(["a"], [[]])


def test_rouge_summary_shape_and_mean():
    predictions = ["the cat sat", "a dog ran home", "nothing matches"]
    references = ["the cat sat on the mat", "a dog ran home", "completely different"]
    summary = rouge_summary(predictions, references, samples=200, seed=1)
    per_doc = rouge_per_document(predictions, references)
    assert list(summary) == list(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        assert summary[key]["mean"] == pytest.approx(np.mean(per_doc[key]))
        assert summary[key]["low"] <= summary[key]["mean"] <= summary[key]["high"]


def test_per_document_scores_give_the_same_intervals_as_before():
    # evaluate() now scores each document once and keeps the scores; its intervals must not change.
    from peftsum.evaluation.evaluate import _rouge_scores

    predictions = ["the cat sat", "a dog ran home", "nothing matches", "the mat"]
    references = ["the cat sat on the mat", "a dog ran home", "completely different", ["a mat", "the cat"]]
    per_doc = rouge_per_document(predictions, references)
    expected = rouge_summary(predictions, references, samples=200, seed=1)
    assert rouge_intervals(per_doc, samples=200, seed=1) == expected
    rouge, stored = _rouge_scores(predictions, references, samples=200, seed=1)
    assert rouge == expected
    assert stored == {key: [round(v, 3) for v in per_doc[key]] for key in ROUGE_KEYS}
    assert stored["rouge1"][0] == 66.667


# --- sentence splitting --------------------------------------------------------


def test_split_sentences_basic():
    assert split_sentences("Dr. Smith arrived. He left at 3 p.m. today.") == [
        "Dr. Smith arrived.",
        "He left at 3 p.m. today.",
    ]
    assert split_sentences("") == []
    assert split_sentences(" \n\t ") == []


def test_split_sentences_keeps_characters_pysbd_drops():
    # pysbd itself returns ['8}a)Mr.'] here, losing the "?!".
    assert "".join(split_sentences("8}a)Mr.?!")) == "8}a)Mr.?!"


# Arbitrary unicode mixed with the abbreviations and punctuation pysbd has rules for.
_PIECES = st.sampled_from(list("ab Z9.!?\n\t\"')(-;…") + ["Mr.", "U.S.", "e.g.", " etc.", "?!"]) | st.text(max_size=5)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=40).map("".join))
@example("1. ^._\u201c>\u201de.?!\n$D's~")  # raw pysbd drops the "?!" here too
def test_split_sentences_loses_no_characters(text):
    sentences = split_sentences(text)
    assert all(sentence and sentence == sentence.strip() for sentence in sentences)
    assert "".join("".join(sentences).split()) == "".join(text.split())


# --- bootstrap -----------------------------------------------------------------


def test_bootstrap_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(42)
    small = rng.normal(30, 10, size=20)
    large = rng.normal(30, 10, size=2000)
    small_ci = bootstrap_interval(small, samples=500)
    large_ci = bootstrap_interval(large, samples=500)
    for values, ci in ((small, small_ci), (large, large_ci)):
        assert ci["mean"] == pytest.approx(values.mean())
        assert ci["low"] < ci["mean"] < ci["high"]
    assert large_ci["high"] - large_ci["low"] < (small_ci["high"] - small_ci["low"]) / 3


def test_bootstrap_is_seeded():
    values = list(np.random.default_rng(0).uniform(0, 100, size=50))
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)
    assert paired_bootstrap(values, values[::-1], seed=5) == paired_bootstrap(values, values[::-1], seed=5)


def test_bootstrap_degenerate_inputs():
    assert bootstrap_interval([1.0, 2.0, 6.0], samples=0) == {"mean": 3.0, "low": 3.0, "high": 3.0}
    assert bootstrap_interval([7.5]) == {"mean": 7.5, "low": 7.5, "high": 7.5}
    with pytest.raises(ValueError):
        bootstrap_interval([])
    with pytest.raises(ValueError):
        bootstrap_interval([1.0, 2.0], confidence=1.5)


def test_paired_bootstrap_detects_clear_difference():
    rng = np.random.default_rng(7)
    b = rng.uniform(20, 40, size=100)
    a = b + 5 + rng.normal(0, 1, size=100)
    result = paired_bootstrap(list(a), list(b))
    assert result["diff"] == pytest.approx(np.mean(a - b))
    assert 0 < result["low"] < result["diff"] < result["high"]
    assert result["p_value"] < 0.01
    flipped = paired_bootstrap(list(b), list(a))
    assert flipped["diff"] == pytest.approx(-result["diff"])
    assert flipped["p_value"] < 0.01


def test_paired_bootstrap_identical_and_noisy_systems():
    values = list(np.random.default_rng(1).uniform(0, 100, size=60))
    same = paired_bootstrap(values, values)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
    rng = np.random.default_rng(2)
    noisy = paired_bootstrap(list(rng.normal(30, 10, 60)), list(rng.normal(30, 10, 60)))
    assert noisy["low"] < 0 < noisy["high"]
    assert noisy["p_value"] > 0.05
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
    assert math.isnan(paired_bootstrap([1.0, 2.0], [0.0, 0.0], samples=0)["p_value"])


# --- reading files -------------------------------------------------------------


def test_read_jsonl_default_and_explicit_field(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(
        '{"id": 1, "summary": "first", "target": "t1"}\n'
        "\n"
        '{"id": 2, "summary": "second", "target": ["t2a", "t2b"]}\n',
        encoding="utf-8",
    )
    assert read_summaries(path) == ["first", "second"]
    assert read_summaries(path, field="target") == ["t1", ["t2a", "t2b"]]


def test_read_jsonl_detected_by_content(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text('\n{"references": ["a", "b"]}\n', encoding="utf-8")
    assert read_summaries(path) == [["a", "b"]]


def test_read_text_keeps_blank_lines(tmp_path):
    path = tmp_path / "preds.txt"
    path.write_text("one\n\nthree\r\n", encoding="utf-8")
    assert read_summaries(path) == ["one", "", "three"]
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert read_summaries(empty) == []


def test_read_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"summary": "ok"}\n{"summary": "oops"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        read_summaries(path)


def test_read_missing_field_names_line_and_keys(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"summary": "ok"}\n{"id": 3, "text": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2 has no field 'summary'; its keys are: id, text"):
        read_summaries(path)
    with pytest.raises(UserError, match=r"line 1 has no field 'abstract'; its keys are: summary"):
        read_summaries(path, field="abstract")
    none_known = tmp_path / "unknown.jsonl"
    none_known.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1 has none of the fields .*its keys are: text"):
        read_summaries(none_known)


def test_read_bad_value_missing_file_and_non_utf8(tmp_path):
    bad_value = tmp_path / "num.jsonl"
    bad_value.write_text('{"summary": 5}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1: field 'summary' must be a string"):
        read_summaries(bad_value)
    with pytest.raises(UserError, match="file not found"):
        read_summaries(tmp_path / "nope.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt is not UTF-8"):
        read_summaries(latin)


# --- formatting ----------------------------------------------------------------


def test_format_table():
    summary = {
        "rouge1": {"mean": 36.123, "low": 33.5, "high": 38.9},
        "rougeLsum": {"mean": 100.0, "low": 99.994, "high": 100.0},
    }
    assert format_table(summary) == "rouge1     36.12  [33.50, 38.90]\nrougeLsum 100.00  [99.99, 100.00]"
