"""The statistics of a comparison, computed once and stored in results.json: seed summaries, the ranking of the
methods, paired tests over the same eval documents (each with the difference it could resolve and its Holm-adjusted
p-value), the answer the report opens with, and each trained run against the untouched model.

`compare` calls `analyze` whenever it publishes results; report.py and the model cards render what they find here
and compute nothing. The tests are seeded (seed 0), so the same results give the same statistics every time.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..evaluation.metrics import ROUGE_KEYS, holm, paired_bootstrap, resolvable_difference
from .results import (
    SCHEMA_VERSION,
    ZERO_SHOT,
    Analysis,
    Answer,
    BaselineAnalysis,
    BaselineResult,
    MethodResult,
    PairedDifference,
    PairedTest,
    Results,
    SeedSummary,
    Split,
    UntouchedComparison,
)

BEFORE = "untouched model"  # the name the untouched model in the run's format goes by in tests
ALPHA = 0.05  # significance threshold of the paired tests
DEFAULT_SAMPLES = 1000  # EvalConfig's default, for results written before the config recorded it
TESTED_KEYS = ("rouge1", "rouge2", "rougeL")  # the ROUGE keys the verdict draws conclusions on


def seed_summary(seed_runs: list[dict]) -> SeedSummary:
    """Mean and sample standard deviation (ddof=1) over seeds of the after-training scores.

    Returns {"n": N, "eval": {"loss": {"mean", "std"}, "rouge1": {"mean", "std"}, ...}, "train": same}; ROUGE keys
    are those of metrics.ROUGE_KEYS, each seed contributing its mean F1 x 100. A split no seed scored is None; with
    a single scored seed the std is None (undefined), not 0.
    """
    after = [run.get("after") or {} for run in seed_runs]
    return {"n": len(seed_runs), "eval": _across_seeds([a.get("eval") for a in after]),
            "train": _across_seeds([a.get("train") for a in after])}


def _across_seeds(splits: list[Split | None]) -> dict | None:
    splits = [s for s in splits if s is not None]
    if not splits:
        return None
    columns = {"loss": [s["loss"] for s in splits]}
    columns.update({k: [s["rouge"][k]["mean"] for s in splits] for k in ROUGE_KEYS})
    return {key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}
            for key, v in columns.items()}


def seed_runs(method: MethodResult) -> list[dict]:
    """The method's runs when it was trained with several seeds, else [] (one seed reports as a single run)."""
    runs = method.get("seed_runs") or []
    return runs if len(runs) > 1 else []


def eval_after(method: MethodResult) -> Split | None:
    return method["after"]["eval"]


def samples_of(results: dict) -> int:
    samples = results["config"].get("eval", {}).get("bootstrap_samples")
    return DEFAULT_SAMPLES if samples is None else int(samples)


def _eval_mean(method: MethodResult, key: str) -> float:
    """Eval loss or ROUGE mean that ranks the method: over its seeds when it has several."""
    if seed_runs(method):
        return method["across_seeds"]["eval"][key]["mean"]
    split = eval_after(method)
    return split["loss"] if key == "loss" else split["rouge"][key]["mean"]


def _per_document(split: Split | None, key: str) -> list[float] | None:
    return (split or {}).get("per_document", {}).get(key)


def method_scores(method: MethodResult, key: str) -> list[float] | None:
    """Per-document eval scores; with several seeds, each document's mean over the seeds."""
    runs = seed_runs(method)
    splits = [r["after"]["eval"] for r in runs] if runs else [eval_after(method)]
    scores = [_per_document(s, key) for s in splits]
    if any(s is None for s in scores) or len({len(s) for s in scores}) != 1:
        return None
    return list(np.mean(scores, axis=0))


def _ranking(methods: dict[str, MethodResult], key: str) -> list[str]:
    """Scored methods, best first: highest eval mean of a ROUGE key, or lowest eval loss for key "loss"."""
    scored = [n for n, m in methods.items() if eval_after(m) is not None]
    sign = 1 if key == "loss" else -1
    return sorted(scored, key=lambda n: sign * _eval_mean(methods[n], key))


def baseline_name(key: str) -> str:
    """A baseline's name in tests: BEFORE for the run-format zero-shot (today's "untouched model"), else its key."""
    return BEFORE if key == ZERO_SHOT else key


def _scored_baselines(results: dict) -> dict[str, BaselineResult]:
    """Baselines with eval scores, by test name, in the order they were scored."""
    return {baseline_name(k): b for k, b in results["baselines"].items() if b.get("eval") is not None}


def _baseline_analysis(baselines: dict[str, BaselineResult]) -> BaselineAnalysis:
    means = {n: {key: b["eval"]["rouge"][key]["mean"] for key in TESTED_KEYS} for n, b in baselines.items()}
    ranking = {key: sorted(means, key=lambda n: -means[n][key]) for key in TESTED_KEYS}
    return {"labels": {n: b["label"] for n, b in baselines.items()}, "ranking": ranking,
            "strongest": {key: ranked[0] for key, ranked in ranking.items() if ranked}, "eval_means": means}


def _pairs(ranking: dict[str, list[str]], baselines: dict[str, BaselineResult]) -> list[tuple[str, str, str]]:
    """(a, b, key) for every test the report states: the leader against each other method, each method against
    the untouched model and against every other baseline, and the untouched model in the run's format against the
    same model in the other format."""
    others = [n for n in baselines if n != BEFORE]
    zero_shots = [n for n in others if baselines[n]["kind"] == "zero-shot"]
    pairs = []
    for key in TESTED_KEYS:
        ranked = ranking[key]
        pairs += [(ranked[0], other, key) for other in ranked[1:]] + [(n, BEFORE, key) for n in ranked]
        pairs += [(n, b, key) for n in ranked for b in others] + [(BEFORE, b, key) for b in zero_shots]
    return list(dict.fromkeys(pairs))


def _verdict_family(ranking: dict[str, list[str]], baselines: BaselineAnalysis) -> set[tuple[str, str, str]]:
    """(a, b, key) of the tests the verdict draws its conclusions from: the leader against each other method per
    tested key, and on ROUGE-1 each method against the untouched model and against the strongest baseline, and the
    untouched model in the run's format against the other zero-shot format. Holm's correction runs over these."""
    family = {(ranked[0], other, key) for key in TESTED_KEYS for ranked in [ranking[key]] for other in ranked[1:]}
    strongest = baselines["strongest"].get("rouge1")
    for name in ranking["rouge1"]:
        family |= {(name, BEFORE, "rouge1")} | ({(name, strongest, "rouge1")} if strongest else set())
    zero_shots = [n for n in baselines["labels"] if n != BEFORE]
    return family | {(BEFORE, b, "rouge1") for b in zero_shots}


def _adjust(tests: list[PairedTest], family: set[tuple[str, str, str]]) -> None:
    """Holm-adjust the verdict's family of tests together, and the remaining tests (only in the Significance
    tables) as a family of their own; in place, as "p_holm" and "in_verdict"."""
    for in_verdict in (True, False):
        members = [t for t in tests if ((t["a"], t["b"], t["metric"]) in family) == in_verdict]
        for test, adjusted in zip(members, holm([t["p_value"] for t in members])):
            test["p_holm"], test["in_verdict"] = adjusted, in_verdict


def _answer(results: dict, ranking: dict[str, list[str]], baselines: BaselineAnalysis,
            tests: list[PairedTest]) -> Answer:
    """What to use, from the best method on ROUGE-1 against the strongest baseline: train it where it scores
    significantly (Holm) above, else do not train and use the baseline; with the test and what training it costs.
    Untested (no per-document scores, or no resamples), the method must clear the baseline's 95% interval."""
    best = ranking["rouge1"][0] if ranking["rouge1"] else None
    strongest = baselines["strongest"].get("rouge1")
    test = next((t for t in tests if (t["a"], t["b"], t["metric"]) == (best, strongest, "rouge1")), None)
    if test is not None and test["p_value"] is not None:
        beats = significant(test) and test["diff"] > 0
    else:
        beats = best is not None and strongest is not None and (
            eval_after(results["methods"][best])["rouge"]["rouge1"]["low"]
            > _scored_baselines(results)[strongest]["eval"]["rouge"]["rouge1"]["high"])
    cost = None
    if best is not None:
        method = results["methods"][best]
        cost = {"trainable": method["params"]["trainable"], "trainable_percent": method["params"]["trainable_percent"],
                "seconds": sum(e["seconds"] for e in method["training"]["epochs"])}
    return {"use": best if best is not None and (beats or strongest is None) else strongest,
            "train": best is not None and (beats or strongest is None), "method": best, "baseline": strongest,
            "test": test, "cost": cost}


def trained_runs(results: dict) -> Iterator[tuple[str, dict]]:
    """(method name, run result) for every trained run folder of a comparison (each seed's, for several seeds)."""
    for name, method in results["methods"].items():
        runs = method.get("seed_runs") or []
        for run in runs if len(runs) > 1 else [method]:
            yield name, run


def _bootstrap(xs: list[float], ys: list[float], samples: int) -> PairedDifference:
    """The seeded paired bootstrap of mean(xs) - mean(ys), its p-value None where no resamples were drawn, and the
    smallest difference these documents resolve (metrics.resolvable_difference)."""
    test = paired_bootstrap(xs, ys, samples=samples, seed=0)
    return {**test, "p_value": None if math.isnan(test["p_value"]) else test["p_value"],
            "n": len(xs), "resolvable": resolvable_difference(xs, ys)}


def against_untouched(after: dict | None, baseline: dict | None, samples: int) -> UntouchedComparison | None:
    """One trained run (its `after` scores) minus the untouched model in the run's format (`baseline`, results'
    "baseline") on the eval documents: the change of eval loss, and a paired bootstrap per ROUGE key where both have
    per-document scores; None where either was not scored. What a model card's "difference" row shows."""
    mine, theirs = (after or {}).get("eval"), (baseline or {}).get("eval")
    if mine is None or theirs is None:
        return None
    xs, ys = mine.get("per_document") or {}, theirs.get("per_document") or {}
    tests = {key: _bootstrap(xs[key], ys[key], samples)
             for key in ROUGE_KEYS if xs.get(key) and ys.get(key) and len(xs[key]) == len(ys[key])}
    losses = (mine.get("loss"), theirs.get("loss"))
    return {"loss_change": None if None in losses else losses[0] - losses[1], "tests": tests}


def analyze(results: dict) -> Analysis:
    """The ranking, the baselines' ranking and every paired test, where both sides have per-document scores on the
    same documents (Holm-adjusted over the verdict's family); the answer; and every trained run (by its folder)
    against the untouched model."""
    methods, samples = results["methods"], samples_of(results)
    baselines = _scored_baselines(results)
    ranking = {key: _ranking(methods, key) for key in ("loss", *TESTED_KEYS)}
    tests: list[PairedTest] = []
    for a, b, key in _pairs(ranking, baselines):
        xs, ys = (_per_document(baselines[n]["eval"], key) if n in baselines else
                  method_scores(methods[n], key) if n in methods else None for n in (a, b))
        if xs is not None and ys is not None and len(xs) == len(ys):
            tests.append({"a": a, "b": b, "metric": key, **_bootstrap(xs, ys, samples)})
    baseline_analysis = _baseline_analysis(baselines)
    _adjust(tests, _verdict_family(ranking, baseline_analysis))
    means = {n: {key: _eval_mean(methods[n], key) for key in ranking} for n in ranking["loss"]}
    runs = {run["dir"]: against_untouched(run.get("after"), results.get("baseline"), samples)
            for _, run in trained_runs(results)}
    return {"alpha": ALPHA, "samples": samples, "ranking": ranking, "eval_means": means, "tests": tests,
            "baselines": baseline_analysis, "answer": _answer(results, ranking, baseline_analysis, tests),
            "against_untouched": {folder: compared for folder, compared in runs.items() if compared is not None}}


def significant(test: PairedTest, alpha: float = ALPHA) -> bool:
    """Whether the test's Holm-adjusted p-value is below alpha."""
    return test["p_holm"] is not None and test["p_holm"] < alpha


def upgrade(results: dict) -> Results:
    """`results` at the current schema: an older file gains its statistics (computed now), and the settings that
    did not exist when it was written read as their defaults (which keep the old behaviour); in place. A newer file
    never gets here: `infra.runs.read_results`, the one reader of results.json, refuses it."""
    from ..config import complete_saved

    complete_saved(results["config"])
    if "baselines" not in results:  # before there were several: the untouched model alone, in the plain format
        base = results.get("baseline")
        results["baselines"] = {} if base is None else {ZERO_SHOT: {
            "kind": "zero-shot", "label": "untouched model (plain)", "dir": "baseline",
            "settings": {"format": "plain"}, "note": None, "train": base.get("train"), "eval": base.get("eval")}}
    results.setdefault("prompt", {"format": "plain", "chosen": "plain",
                                  "template": results["config"]["data"]["template"]})
    for method in results["methods"].values():
        method.setdefault("after", {"train": None, "eval": None})
        for run in [method, *(method.get("seed_runs") or [])]:
            for epoch in run["training"]["epochs"]:  # before budgets, every epoch was whole
                epoch.setdefault("batches", 1)
                epoch.setdefault("of_batches", 1)
        if len(method.get("seed_runs") or []) > 1 and "across_seeds" not in method:
            method["across_seeds"] = seed_summary(method["seed_runs"])
    # An analysis from before the model cards' paired tests ("against_untouched"), or before the answer, the resolvable
    # differences and Holm's adjustment ("answer"), is computed again, once.
    analysis = results.get("analysis", {})
    if results.get("schema_version") != SCHEMA_VERSION or not {"against_untouched", "answer"} <= analysis.keys():
        results["analysis"] = analyze(results)
        results["schema_version"] = SCHEMA_VERSION
    return results

