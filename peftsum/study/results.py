"""What results.json holds: a typed description of a comparison's results, and its schema version.

`compare` writes this dict (and every method's `metrics.json` holds its `MethodResult`); `analysis.py` adds the
statistics, `report.py` and the charts only read it. The types below are documentation that a type checker can
hold the code to: the JSON itself is plain dicts and lists. Files written before `SCHEMA_VERSION` existed are
brought up to date by `analysis.upgrade` (their missing statistics computed), so readers need no branches for
old runs.
"""

from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 3  # 1: before the version was recorded (no "analysis" key); 2: before "baselines" and "prompt"
ZERO_SHOT = "zero-shot"  # the baselines' name for the untouched model in the run's format (results["baseline"])


class Interval(TypedDict):
    mean: float  # F1 x 100
    low: float  # 95% bootstrap interval
    high: float


class Split(TypedDict, total=False):
    """Scores of one model on one subset ("train" rows drawn from the training data, or "eval")."""

    loss: float | None  # mean cross-entropy (nats) per summary token; None for a system without one (lead-k)
    n: int  # examples
    tokens: int | None  # summary tokens the loss covers
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


class ValidationPoint(TypedDict, total=False):
    """One validation during training (train.eval_every): the loss on the validation examples at `step`."""

    step: int
    epoch: int
    loss: float  # mean cross-entropy (nats) per summary token
    tokens: int  # summary tokens the loss covers
    rouge1: float  # with train.eval_rouge: mean F1 x 100 (also rouge2, rougeL, rougeLsum)


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
    # Only with validation during training (train.eval_every):
    validation: list[ValidationPoint]
    best_step: int | None  # the point of lowest validation loss
    stopped_early: bool  # train.early_stopping_patience ended the run
    weights_step: int  # the step the saved weights (and the after-training scores) come from: best_step with keep_best


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


class BaselineResult(TypedDict, total=False):
    """One baseline (baselines.py): its scores on the same subsets as the methods, and what it is."""

    kind: str  # zero-shot | lead | few-shot
    label: str  # its name in tables, e.g. "untouched model (chat)", "lead-3"
    dir: str  # its folder, relative to the comparison
    settings: dict  # format (zero-shot, few-shot); k and unit (lead); most_shots (few-shot)
    note: str | None  # e.g. why a few-shot baseline was skipped
    train: Split | None
    eval: Split | None
    shots: int  # few-shot: the worked examples in every prompt
    shot_ids: list[str]  # few-shot: their ids in the training data


class PromptInfo(TypedDict, total=False):
    """The prompt format the methods were trained and scored in (prompts.py's `describe`)."""

    format: str  # plain | chat
    chosen: str  # data.format as configured: plain | chat | auto
    template: str  # plain
    instruction: str  # chat
    system: str | None  # chat
    end_of_turn: str  # chat: the tokens that end a summary, e.g. "<|im_end|>"


class PairedTest(TypedDict):
    a: str  # a method, or analysis.BEFORE (the zero-shot baseline in the other format's test)
    b: str  # a method, analysis.BEFORE (the untouched model in the run's format) or another baseline's name
    metric: str  # a ROUGE key
    diff: float  # mean(a) - mean(b), F1 x 100, on the same eval documents
    low: float
    high: float
    p_value: float | None  # two-sided, raw; None where no resamples were drawn
    n: int  # documents
    resolvable: float | None  # smallest true difference found at 5% with 80% power (metrics.resolvable_difference)
    p_holm: float | None  # Holm-adjusted over its family; what "significant" means (analysis.significant)
    in_verdict: bool  # its family: the verdict's tests, or the other tests of the Significance tables


class PairedDifference(TypedDict):
    diff: float  # mean(a) - mean(b), F1 x 100, on the same eval documents
    low: float  # 95% paired bootstrap interval
    high: float
    p_value: float | None  # two-sided; None where no resamples were drawn
    n: int  # documents
    resolvable: float | None  # smallest true difference found at 5% with 80% power (metrics.resolvable_difference)


class Cost(TypedDict):
    trainable: int  # trainable parameters of the recommended (or best) method
    trainable_percent: float
    seconds: float  # its training time


class Answer(TypedDict):
    """The report's opening: what to use, by how much and how sure, and what it costs."""

    use: str | None  # the method to train, or (train False) the baseline to use instead; None with neither scored
    train: bool
    method: str | None  # the best method on eval ROUGE-1
    baseline: str | None  # the strongest baseline on eval ROUGE-1 (a test name: analysis.BEFORE or a baseline key)
    test: PairedTest | None  # method minus baseline on ROUGE-1; None where not tested
    cost: Cost | None  # the method's; None without a method


class UntouchedComparison(TypedDict):
    """One trained run against the untouched model in the run's format (results["baseline"]), on the same eval
    documents: its model card's "difference (paired)" row."""

    loss_change: float | None  # eval loss of the run minus the untouched model's
    tests: dict[str, PairedDifference]  # ROUGE key -> paired bootstrap, where both have per-document scores


class Analysis(TypedDict):
    alpha: float  # significance threshold
    samples: int  # bootstrap resamples of the paired tests
    ranking: dict[str, list[str]]  # "loss" and each ROUGE key: the scored methods, best first
    eval_means: dict[str, dict[str, float]]  # method -> key -> the eval mean that ranks it (over seeds)
    tests: list[PairedTest]
    baselines: BaselineAnalysis
    answer: Answer
    against_untouched: dict[str, UntouchedComparison]  # trained run folder (MethodResult's "dir") -> comparison


class BaselineAnalysis(TypedDict):
    """The baselines by test name (analysis.BEFORE for the run-format zero-shot, else results["baselines"]'s key)."""

    labels: dict[str, str]  # test name -> table label
    ranking: dict[str, list[str]]  # each tested ROUGE key: the scored baselines, best first
    strongest: dict[str, str]  # each tested ROUGE key: the best baseline on the eval split
    eval_means: dict[str, dict[str, float]]  # name -> ROUGE key -> eval mean


class Results(TypedDict):
    schema_version: int
    peftsum_version: str
    created: str
    config: dict  # RunConfig.to_dict()
    environment: dict
    model: dict
    data: dict
    baseline: Scores | None  # the untouched model in the run's format (= baselines["zero-shot"]'s scores); None when
    # it was not scored
    baselines: dict[str, BaselineResult]  # every baseline scored, by name ("zero-shot", "zero-shot-plain", "lead"...)
    prompt: PromptInfo
    methods: dict[str, MethodResult]
    wall_seconds: float
    analysis: Analysis
