"""ROUGE scoring, bootstrap confidence intervals and summary-file reading.

Everything here works offline: sentence splitting uses pysbd rather than nltk's
punkt (whose data cannot be downloaded), and rougeLsum is always fed text that
is already one sentence per line.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..infra.files import parse_jsonl, read_text

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_FIELDS = ("prediction", "summary", "reference", "references", "highlights", "target")

_segmenter = None
_scorers: dict[str, object] = {}


def _get_segmenter():
    # Building a pysbd Segmenter compiles many regexes; do it once, and only when needed.
    global _segmenter
    if _segmenter is None:
        import pysbd

        _segmenter = pysbd.Segmenter(language="en", clean=False)
    return _segmenter


def split_sentences(text: str) -> list[str]:
    """Split `text` into stripped, non-empty sentences with pysbd (English, offline).

    Every non-whitespace character of `text` ends up in exactly one sentence, in order.
    """
    if not text or text.isspace():
        return []
    # pysbd sometimes drops characters (e.g. "?!" after "Mr."), so its segments
    # are only used to find where sentences start; the sentences themselves are
    # slices of the original text, which therefore always add up to all of it.
    starts = [0]
    cursor = 0
    for segment in _get_segmenter().segment(text):
        segment = segment.strip()
        if not segment:
            continue
        position = text.find(segment, cursor)
        if position < 0:
            continue  # pysbd altered this segment; leave it merged with the previous one
        if position > starts[-1]:
            starts.append(position)
        cursor = position + len(segment)
    bounds = starts + [len(text)]
    pieces = (text[a:b].strip() for a, b in zip(bounds, bounds[1:]))
    return [piece for piece in pieces if piece]


def _scorer(kind: str):
    # Two scorers: n-gram/rougeL see the raw text, while rougeLsum sees the
    # newline-joined sentences. Neither sets split_summaries, the only path in
    # rouge_score 0.1.2 that calls nltk.sent_tokenize (and so needs punkt).
    if kind not in _scorers:
        from rouge_score import rouge_scorer

        types = ["rougeLsum"] if kind == "lsum" else ["rouge1", "rouge2", "rougeL"]
        _scorers[kind] = rouge_scorer.RougeScorer(types, use_stemmer=True)
    return _scorers[kind]


def _one_per_line(text: str) -> str:
    return "\n".join(split_sentences(text))


def rouge_per_document(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> dict[str, list[float]]:
    """Per-document ROUGE F1 (x100) for rouge1, rouge2, rougeL and rougeLsum.

    A reference may be one string or a list of strings; with several, each key
    takes the best F1 over them (rouge_score's `score_multi`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    plain, lsum = _scorer("plain"), _scorer("lsum")
    result: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        targets = [reference] if isinstance(reference, str) else list(reference)
        if not targets:
            raise ValueError(f"document {index} has an empty list of references")
        scores = plain.score_multi(targets, prediction)
        scores.update(lsum.score_multi([_one_per_line(t) for t in targets], _one_per_line(prediction)))
        for key in ROUGE_KEYS:
            result[key].append(float(scores[key].fmeasure) * 100.0)
    return result


def _resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    # Draw the index matrix in chunks so 1000 samples x 100k documents does not need gigabytes.
    rows_per_chunk = max(1, 2_000_000 // n)
    means = []
    for start in range(0, samples, rows_per_chunk):
        rows = min(rows_per_chunk, samples - start)
        means.append(values[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    return np.concatenate(means)


def _check_bootstrap_args(n: int, samples: int, confidence: float) -> None:
    if n == 0:
        raise ValueError("cannot bootstrap an empty list of values")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


def bootstrap_interval(
    values: Sequence[float], samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, float]:
    """Percentile-bootstrap interval of the mean: {"mean", "low", "high"}.

    With samples=0 or a single value, low == high == mean. Raises ValueError on empty input.
    """
    array = np.asarray(values, dtype=float)
    _check_bootstrap_args(len(array), samples, confidence)
    mean = float(array.mean())
    if samples == 0 or len(array) == 1:
        return {"mean": mean, "low": mean, "high": mean}
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(_resampled_means(array, samples, seed), [tail, 100.0 - tail])
    return {"mean": mean, "low": float(low), "high": float(high)}


def rouge_summary(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Mean ROUGE with a 95% bootstrap interval per key: {"rouge1": {"mean", "low", "high"}, ...}."""
    return rouge_intervals(rouge_per_document(predictions, references), samples, seed)


def rouge_intervals(
    per_document: dict[str, Sequence[float]], samples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """`rouge_summary` from scores already computed by `rouge_per_document`, so callers that keep them score once."""
    return {key: bootstrap_interval(per_document[key], samples, seed) for key in ROUGE_KEYS}


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap of mean(a) - mean(b) over the same documents.

    Returns {"diff", "low", "high", "p_value"}; the interval is 95%, and p_value is
    two-sided (twice the share of resampled differences on the far side of zero,
    capped at 1). A p_value of 0 means below 1/samples. With samples=0 the
    p_value is NaN.
    """
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs equal lengths, got {len(a)} and {len(b)}")
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    _check_bootstrap_args(len(differences), samples, 0.95)
    diff = float(differences.mean())
    if samples == 0:
        return {"diff": diff, "low": diff, "high": diff, "p_value": math.nan}
    means = _resampled_means(differences, samples, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    if diff > 0:
        share = float(np.mean(means <= 0))
    elif diff < 0:
        share = float(np.mean(means >= 0))
    else:
        share = 0.5  # no observed difference, so p = 1: the data say nothing against equality
    return {"diff": diff, "low": float(low), "high": float(high), "p_value": min(1.0, 2.0 * share)}


# z quantiles of the resolvable difference: two-sided 5% test (z_0.975) and 80% power (z_0.80).
Z_TWO_SIDED_5 = 1.959963984540054
Z_POWER_80 = 0.8416212335729143


def resolvable_difference(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The smallest true mean difference a paired test over these documents detects at two-sided 5% with 80% power.

    MDE = (z_0.975 + z_0.80) * sd(a - b) / sqrt(n), with sd the sample standard deviation (ddof 1) of the
    per-document paired differences: the normal approximation to the paired test (for a bootstrap of the mean over
    tens of documents or more it is close; with few documents the true power at the MDE is somewhat below 80%).
    None with fewer than two documents, where the spread is undefined.
    """
    if len(a) != len(b):
        raise ValueError(f"the resolvable difference needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float((Z_TWO_SIDED_5 + Z_POWER_80) * differences.std(ddof=1) / math.sqrt(len(differences)))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values, in their order; None (untested) stays None and is not
    counted in the family.

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) * p_(j)): rejecting where the
    adjusted p < alpha keeps the chance of any false positive in the family at most alpha.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def read_summaries(path: str | os.PathLike, field: str | None = None) -> list[str] | list[list[str]]:
    """Read predictions or references, one per document, from JSONL or plain text.

    JSONL (`.jsonl`/`.json-lines`, or a first non-empty line starting with "{"):
    `field`, or else the first of DEFAULT_FIELDS present in the first row, is
    read from every row; its value is a string or a list of strings. Plain text:
    one summary per line, blank lines included, so line i is document i.
    Raises UserError for unreadable, non-UTF-8 or malformed files.
    """
    text = read_text(path)
    lines = text.split("\n")
    first = next((line for line in lines if line.strip()), "")
    is_jsonl = str(path).lower().endswith((".jsonl", ".json-lines")) or first.lstrip().startswith("{")
    if not is_jsonl:
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line is not an extra document
        return [line.rstrip("\r") for line in lines]

    summaries: list = []
    for number, row in parse_jsonl(text, path):
        if field is None:
            # Chosen from the first row and then required everywhere, so a file
            # never silently mixes, say, "summary" and "target" columns.
            field = next((name for name in DEFAULT_FIELDS if name in row), None)
            if field is None:
                raise UserError(
                    f"{path}: line {number} has none of the fields {', '.join(DEFAULT_FIELDS)};"
                    f" its keys are: {', '.join(row) or '(none)'}"
                )
        if field not in row:
            raise UserError(
                f"{path}: line {number} has no field {field!r}; its keys are: {', '.join(row) or '(none)'}"
            )
        value = row[field]
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            summaries.append(list(value))
        elif isinstance(value, str):
            summaries.append(value)
        else:
            raise UserError(
                f"{path}: line {number}: field {field!r} must be a string or a non-empty list of strings"
            )
    return summaries


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """Plain-text table, one row per key: name, mean and interval with 2 decimals."""
    rows = [
        f"{name:<9} {stats['mean']:>6.2f}  [{stats['low']:.2f}, {stats['high']:.2f}]"
        for name, stats in summary.items()
    ]
    return "\n".join(rows)
