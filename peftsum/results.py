"""What results.json holds: a typed description of a comparison's results, and its schema version.

`compare` writes this dict (and every method's `metrics.json` holds its `MethodResult`); `analysis.py` adds the
statistics, `report.py` and the charts only read it. The types below are documentation that a type checker can
hold the code to: the JSON itself is plain dicts and lists. Files written before `SCHEMA_VERSION` existed are
brought up to date by `analysis.upgrade` (their missing statistics computed), so readers need no branches for
old runs.
"""

from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 2  # 1: before the version was recorded (no "analysis" key)


class Interval(TypedDict):
    mean: float  # F1 x 100
    low: float  # 95% bootstrap interval
    high: float


class Split(TypedDict, total=False):
    """Scores of one model on one subset ("train" rows drawn from the training data, or "eval")."""

    loss: float  # mean cross-entropy (nats) per summary token
    n: int  # examples
    tokens: int  # summary tokens the loss covers
    rouge: dict[str, Interval]  # rouge1, rouge2, rougeL, rougeLsum
    per_document: dict[str, list[float]]  # the same keys: each document's F1 x 100, in subset order


class Scores(TypedDict):
    train: Split | None
    eval: Split | None


class Params(TypedDict):
    total: int
    trainable: int
    trainable_percent: float
    description: str


class Epoch(TypedDict):
    epoch: int
    seconds: float
    tokens: int
    tokens_per_s: float
    mean_loss: float
    batches: int  # batches trained in this epoch (fewer than of_batches when a budget ran out)
    of_batches: int


class Training(TypedDict, total=False):
    epochs: list[Epoch]
    steps: int
    seconds: float
    tokens: int
    budget: dict | None  # {"kind": "seconds" | "tokens", "limit": number}
    epochs_completed: float
    tokens_per_s: float
    peak_memory_mb: float | None
    loss_curve: list[list[float]]  # [step, loss]
    resumed_from_step: int | None
    processes: int  # only with several processes
    compiled: bool  # whether the blocks trained compiled (train.compile); absent in runs before it was recorded


class SeedStats(TypedDict):
    mean: float
    std: float | None  # sample standard deviation (ddof 1); None with one seed


class SeedSummary(TypedDict):
    n: int
    eval: dict[str, SeedStats] | None  # loss and each ROUGE key
    train: dict[str, SeedStats] | None


class MethodResult(TypedDict, total=False):
    params: Params
    training: Training
    after: Scores
    dir: str  # the method's folder, relative to the comparison
    seed_runs: list[dict]  # several seeds: each seed's MethodResult plus "seed"
    across_seeds: SeedSummary  # several seeds: mean and spread of the after-training scores


class PairedTest(TypedDict):
    a: str
    b: str  # a method, or analysis.BEFORE (the untouched model)
    metric: str  # a ROUGE key
    diff: float  # mean(a) - mean(b), F1 x 100, on the same eval documents
    low: float
    high: float
    p_value: float | None  # two-sided; None where no resamples were drawn


class Analysis(TypedDict):
    alpha: float  # significance threshold
    samples: int  # bootstrap resamples of the paired tests
    ranking: dict[str, list[str]]  # "loss" and each ROUGE key: the scored methods, best first
    eval_means: dict[str, dict[str, float]]  # method -> key -> the eval mean that ranks it (over seeds)
    tests: list[PairedTest]


class Results(TypedDict):
    schema_version: int
    peftsum_version: str
    created: str
    config: dict  # RunConfig.to_dict()
    environment: dict
    model: dict
    data: dict
    baseline: Scores | None  # the untouched model; None when eval.before is off
    methods: dict[str, MethodResult]
    wall_seconds: float
    analysis: Analysis
