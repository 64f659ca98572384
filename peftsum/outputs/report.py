"""Turn a run's results (the content of results.json) into report.md plus two PNG charts.

Rendering only: the statistics (ranking, paired tests, seed summaries) come computed in the results
(analysis.py, results.py); results from older peftsum versions are brought up to date by `analysis.upgrade` first.
`render_markdown` is pure, so the text can be tested and diffed; `write_report` adds the charts and the file writes.
Every number that may be missing (a skipped split, no baseline, no GPU memory on CPU) renders as "–".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

# A Figure without pyplot renders headless and leaves the user's global matplotlib backend alone.
from matplotlib.figure import Figure

from ..infra.files import atomic_write, write_text
from ..infra.runs import LOSS_PLOT, REPORT, ROUGE_PLOT
from ..study.analysis import ALPHA, BEFORE, eval_after, samples_of, seed_runs, significant
from ..study.results import ZERO_SHOT, PairedTest, Results
from .formatting import DASH, ci, duration, epochs_done, fmt, number, overlap, p_value, pm, rouge, sig4, signed, table
from .report_html import write_html

__all__ = ["answer_sentences", "loss_figure", "render_markdown", "write_report"]

ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))


# ---------------------------------------------------------------- seeds, budgets, paired tests


def _seeds(cfg: dict) -> str:
    """"seed 7", or "seeds 7–9" when each method was trained with seeds train.seed, train.seed + 1, ..."""
    seed, n = cfg["train"]["seed"], cfg["seeds"]
    return f"seeds {seed}–{seed + n - 1}" if n > 1 and seed is not None else f"seed {fmt(seed, '')}"


def _label(name: str, method: dict) -> str:
    runs = seed_runs(method)
    return f"{name} ({len(runs)} seeds)" if runs else name


def _budget(results: dict) -> str | None:
    train = results["config"]["train"]
    if train["budget_seconds"]:
        return f"Equal budget: {number(train['budget_seconds'])} s of training wall-clock per method."
    if train["budget_tokens"]:
        return f"Equal budget: {number(train['budget_tokens'])} training tokens per method."
    return None


def _tests(results: Results) -> dict[tuple[str, str, str], PairedTest]:
    """The stored paired tests by (a, b, ROUGE key)."""
    return {(t["a"], t["b"], t["metric"]): t for t in results["analysis"]["tests"]}


def _eval_mean(results: Results, name: str, key: str) -> float:
    return results["analysis"]["eval_means"][name][key]


def _name(results: Results, name: str) -> str:
    """A test's side as the tables name it: a method, or a baseline's label."""
    return results["analysis"]["baselines"]["labels"].get(name, name)


def _resolvable(test: dict) -> str:
    """"n = 30 documents could resolve about ±4.1 ROUGE-1": what a test that found nothing could have found."""
    if test.get("resolvable") is None:
        return f"n = {test['n']} documents cannot estimate what they resolve"
    return f"n = {test['n']} documents could resolve about ±{test['resolvable']:.1f} {dict(ROUGE)[test['metric']]}"


def _p_values(test: dict, samples: int) -> str:
    """"p = 0.010, Holm-adjusted p = 0.040": the raw p-value and the one "significant" is judged by."""
    return f"p {p_value(test['p_value'], samples)}, Holm-adjusted p {p_value(test['p_holm'], samples)}"


def _test_text(test: dict, samples: int, prefix: str = "") -> str:
    """"(95% CI −0.4 to +4.6, p = 0.10, Holm-adjusted p = 0.40): **no significant difference** (n = 30 documents
    could resolve about ±4.1 ROUGE-1)", or "(not tested)" without resamples."""
    if test["p_value"] is None:
        return f"({prefix}not tested)"
    interval = f"95% CI {signed(test['low'])} to {signed(test['high'])}, {_p_values(test, samples)}"
    return f"({prefix}{interval}): " + ("significant at the 5% level" if significant(test)
                                        else f"**no significant difference** ({_resolvable(test)})")


# ---------------------------------------------------------------- the answer


def answer_sentences(results: Results) -> list[str]:
    """At most three sentences, plain text: what to use, by how much and how sure, and what it costs; from the
    stored answer (analysis.py). `peftsum compare` prints them last, report.md opens with them."""
    answer, samples = results["analysis"]["answer"], samples_of(results)
    method, baseline, test, cost = answer["method"], answer["baseline"], answer["test"], answer["cost"]
    if method is None:
        return [f"No method was run; the strongest baseline on eval ROUGE-1 is {_name(results, baseline)}."
                if baseline else "No method was run and no baseline was scored."]
    if baseline is None:
        first = (f"Use {method}: it has the best eval ROUGE-1 ({_eval_mean(results, method, 'rouge1'):.1f}); "
                 "no baseline was scored to test it against.")
    elif test is None or test["p_value"] is None:
        difference = _eval_mean(results, method, "rouge1") - results["analysis"]["baselines"]["eval_means"][
            baseline]["rouge1"]
        first = (f"Use {method}: it scores {signed(difference)} ROUGE-1 above {_name(results, baseline)}, not "
                 "tested, but clear of the baseline's 95% interval." if answer["train"] else
                 f"Do not train: use {_name(results, baseline)}; the best method, {method}, scores "
                 f"{signed(difference)} ROUGE-1 against it, not tested, within the baseline's 95% interval.")
    else:
        how_sure = (f"on {test['n']} eval documents (95% CI {signed(test['low'])} to {signed(test['high'])}, "
                    f"{_p_values(test, samples)})")
        if answer["train"]:
            first = (f"Use {method}: it scores {signed(test['diff'])} ROUGE-1 above {_name(results, baseline)} "
                     f"{how_sure}; the test resolves about ±{fmt(test['resolvable'], '.1f')} ROUGE-1.")
        else:
            outcome = ("significantly below it" if significant(test)
                       else f"no significant difference, and {_resolvable(test)}")
            first = (f"Do not train: use {_name(results, baseline)}; the best method, {method}, scores "
                     f"{signed(test['diff'])} ROUGE-1 against it {how_sure}: {outcome}.")
    share = f"{sig4(cost['trainable_percent'])} % of the model"
    if answer["train"]:
        return [first, f"It trains {cost['trainable']:,} parameters ({share}) in {duration(cost['seconds'])}."]
    return [first, f"Training {method} took {duration(cost['seconds'])} for {cost['trainable']:,} trainable "
                   f"parameters ({share}); the baseline needs no training."]


# ---------------------------------------------------------------- markdown sections


def _leader_lines(results: dict, tests: dict) -> list[str]:
    """Per ROUGE key: the leader by eval mean against each other method, by paired test or else by intervals."""
    methods, samples = results["methods"], samples_of(results)
    lines = []
    for key, label in ROUGE:
        first, *others = results["analysis"]["ranking"][key]
        for other in others:
            test = tests.get((first, other, key))
            if test is not None:
                leader = f"**{first}**" if significant(test) else first
                lines.append(f"- {leader} leads {other} on {label} by {signed(test['diff'])} "
                             f"{_test_text(test, samples)}.")
                continue
            # Older results have no per-document scores: only the intervals can be compared.
            a, b = eval_after(methods[first])["rouge"][key], eval_after(methods[other])["rouge"][key]
            if overlap(a, b):
                lines.append(f"- {first} leads on {label} ({ci(a)}) but its interval overlaps {other}'s "
                             f"({ci(b)}): no clear winner.")
            else:
                lines.append(f"- **{first}** wins on {label} ({ci(a)}), clear of {other} ({ci(b)}).")
    return lines


def _baseline_lines(results: dict, tests: dict) -> list[str]:
    """Each method against the untouched model on ROUGE-1 ("before training" is the same model for every method)."""
    baseline_eval = (results["baseline"] or {}).get("eval")
    if baseline_eval is None:
        return ["- The untouched model was not scored on the eval split, so there is no before/after comparison."]
    before, lines = baseline_eval["rouge"]["rouge1"], []
    for name, m in results["methods"].items():
        if eval_after(m) is None:
            lines.append(f"- {name}: no eval scores after training.")
            continue
        after, test = eval_after(m)["rouge"]["rouge1"], tests.get((name, BEFORE, "rouge1"))
        change = "improved" if _eval_mean(results, name, "rouge1") > before["mean"] else "did not improve"
        if test is not None:
            difference = f"difference {signed(test['diff'])}, "
            lines.append(f"- {name} {change} eval ROUGE-1 over the untouched model "
                         f"{_test_text(test, samples_of(results), difference)}.")
            continue
        noise = "the intervals overlap, so the change is within noise" if overlap(before, after) \
            else "the intervals do not overlap"
        lines.append(f"- {name} {change} eval ROUGE-1 over the untouched model "
                     f"({ci(before)} → {ci(after)}); {noise}.")
    return lines


def _what_it_is(results: dict, name: str) -> tuple[str, str]:
    """(what a baseline is, in prose; the advice when a method does not beat it)."""
    key = ZERO_SHOT if name == BEFORE else name
    baseline = results["baselines"][key]
    if baseline["kind"] == "lead":
        k, unit = baseline["settings"]["k"], baseline["settings"]["unit"]
        return (f"{baseline['label']} (copying the document's first {k} {unit}{'s' if k > 1 else ''})",
                "an extractive baseline does as well")
    form = baseline["settings"]["format"]
    if baseline["kind"] == "few-shot":
        return f"few-shot prompting of the untouched model ({form} format)", "consider not training"
    return f"prompting the untouched model ({form} format)", "consider not training"


def _strongest_lines(results: dict, tests: dict) -> list[str]:
    """The baselines on ROUGE-1, and each method against the strongest of them: the question "is training worth it"."""
    analysis, samples = results["analysis"]["baselines"], samples_of(results)
    ranked = analysis["ranking"].get("rouge1", [])
    if not ranked:
        return []
    rouge = {n: results["baselines"][ZERO_SHOT if n == BEFORE else n]["eval"]["rouge"]["rouge1"] for n in ranked}
    listed = ", ".join(f"{_name(results, n)} {ci(rouge[n])}" for n in ranked[1:])
    lines = [f"- Strongest baseline on eval ROUGE-1: **{_name(results, ranked[0])}** ({ci(rouge[ranked[0]])})"
             + (f"; then {listed}." if listed else ".")]
    for (a, b, key), test in tests.items():
        if a == BEFORE and key == "rouge1":  # the untouched model in its two formats
            lines.append(f"- {_name(results, a)} against {_name(results, b)} on ROUGE-1: {signed(test['diff'])} "
                         f"{_test_text(test, samples)}.")
    strongest = ranked[0]
    what, advice = _what_it_is(results, strongest)
    for name, m in results["methods"].items():
        if eval_after(m) is None:
            continue
        test = tests.get((name, strongest, "rouge1"))
        if test is None:  # no per-document scores: only the intervals can be compared
            after = eval_after(m)["rouge"]["rouge1"]
            beaten, below = after["low"] > rouge[strongest]["high"], after["high"] < rouge[strongest]["low"]
            detail = f"{ci(after)} against {ci(rouge[strongest])}; intervals only, not tested"
        else:
            beaten, below = (significant(test) and test["diff"] > 0), (significant(test) and test["diff"] < 0)
            interval = "not tested" if test["p_value"] is None else (
                f"95% CI {signed(test['low'])} to {signed(test['high'])}, {_p_values(test, samples)}")
            resolvable = "" if beaten or below or test["p_value"] is None else f"; {_resolvable(test)}"
            detail = f"ROUGE-1 {signed(test['diff'])}, {interval}{resolvable}"
        if beaten:
            lines.append(f"- {name} beats the strongest baseline, {_name(results, strongest)} ({detail}).")
        elif below:
            lines.append(f"- **{name} scores significantly below {what}; {advice}** ({detail}).")
        else:
            lines.append(f"- **{name}: no significant gain over {what}; {advice}** ({detail}).")
    return lines


def _method_note(results: dict, tests: dict) -> list[str]:
    if not tests:
        return []
    if samples_of(results) == 0:
        return ["- No significance tests: eval.bootstrap_samples is 0, so differences are stated untested."]
    n = results["data"]["eval_examples"]
    family = sum(1 for t in tests.values() if t["in_verdict"] and t["p_value"] is not None)
    lines = [f"- Differences are mean F1 × 100 over the same {n} eval documents, tested with a paired bootstrap "
             f"({samples_of(results):,} resamples, seed 0); a difference is significant when its Holm-adjusted "
             f"p < {ALPHA}.",
             f"- p-values Holm-adjusted over the {family} tests of the verdict: significant still means 5% for the "
             "whole family (the Significance tables' other tests form a family of their own)."]
    main = results["analysis"]["answer"]["test"]
    if main is not None and main.get("resolvable") is not None:
        lines.append(f"- Resolvable difference of the main comparison ({main['a']} against "
                     f"{_name(results, main['b'])}): about ±{main['resolvable']:.1f} ROUGE-1 at 5% with 80% power "
                     f"over {main['n']} documents (normal approximation from the spread of the paired differences).")
    return lines


def _verdict(results: dict, tests: dict) -> list[str]:
    methods = results["methods"]
    if not methods:
        return ["- No method was run.", *_strongest_lines(results, tests)]
    lines = _method_note(results, tests)
    if len(methods) == 1:
        lines.append(f"- Only one method was run ({next(iter(methods))}), so there is nothing to rank it against.")
    elif len(results["analysis"]["ranking"]["loss"]) < 2:
        lines.append("- Fewer than two methods have eval scores, so there is no ranking on the eval split.")
    else:
        by_loss = results["analysis"]["ranking"]["loss"]
        others = ", ".join(f"{n} {_eval_mean(results, n, 'loss'):.3f}" for n in by_loss[1:])
        lines.append(f"- **{by_loss[0]}** has the lowest eval loss ({_eval_mean(results, by_loss[0], 'loss'):.3f}; "
                     f"{others}).")
        lines += _leader_lines(results, tests)
    lines += _baseline_lines(results, tests)
    lines += _strongest_lines(results, tests)
    if len(methods) > 1:
        fastest = max(methods, key=lambda n: methods[n]["training"]["tokens_per_s"])
        smallest = min(methods, key=lambda n: methods[n]["params"]["trainable"])
        p = methods[smallest]["params"]
        lines.append(f"- Fastest training: **{fastest}** ({methods[fastest]['training']['tokens_per_s']:,.0f} tokens/s).")
        lines.append(f"- Fewest trainable parameters: **{smallest}** ({p['trainable']:,}, "
                     f"{sig4(p['trainable_percent'])} % of the model).")
    return lines


def _cells(split: dict | None, keys: list[str]) -> list[str]:
    """Loss and ROUGE cells of one scored split, ROUGE as mean ± half the 95% interval."""
    return [fmt(split["loss"] if split else None, ".3f"), *(pm(rouge(split, k)) for k in keys)]


def _seed_cells(stats: dict | None, keys: list[str]) -> list[str]:
    """The same cells over several seeds: mean ± sample standard deviation."""
    if stats is None:
        return [DASH] * (1 + len(keys))
    return [f"{stats[k]['mean']:{spec}} ± {fmt(stats[k]['std'], spec)}"
            for k, spec in [("loss", ".3f"), *((k, ".1f") for k in keys)]]


def _after_cells(method: dict, split: str, keys: list[str]) -> list[str]:
    runs = seed_runs(method)
    if runs:
        return _seed_cells(method["across_seeds"][split], keys)
    return _cells(method["after"][split], keys)


def _per_seed_cells(split: dict | None) -> list[str]:
    if split is None:
        return [DASH] * (1 + len(ROUGE))
    return [f"{split['loss']:.3f}", *(f"{split['rouge'][k]['mean']:.1f}" for k, _ in ROUGE)]


def _per_seed(results: dict) -> list[str]:
    rows = [[name, str(run["seed"]), *_per_seed_cells(run["after"]["eval"]),
             fmt(run["training"]["steps"], ","), f"{epochs_done(run['training']):.2f}"]
            for name, m in results["methods"].items() for run in seed_runs(m)]
    if not rows:
        return []
    header = ["Method", "Seed", "Eval loss", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Steps", "Epochs"]
    return ["### Per seed", "", *table(header, rows), "", "ROUGE: mean F1 × 100 on the eval split."]


def _baselines_table(results: dict) -> list[str]:
    """Every baseline on both splits, and what each note says (a few-shot prompt's size, a skipped baseline)."""
    baselines = results["baselines"]
    if not baselines:
        return []
    keys = [k for k, _ in ROUGE] + ["rougeLsum"]
    rows = [[b["label"], *_cells(b["train"], keys[:1]), *_cells(b["eval"], keys)] for b in baselines.values()]
    header = ["Baseline", "Train loss", "Train ROUGE-1", "Eval loss", *(label for _, label in ROUGE), "ROUGE-Lsum"]
    notes = []
    for b in baselines.values():
        if b["kind"] == "few-shot" and b.get("shots"):
            examples = "example" if b["shots"] == 1 else "examples"
            notes.append(f"- {b['label']}: {b['shots']} training {examples} in every prompt (ids "
                         f"{', '.join(map(str, b['shot_ids']))}), drawn with the run's seed.")
        if b.get("note"):
            notes.append(f"- {b['label']}: {b['note']}.")
    return ["### Baselines", "", *table(header, rows), "",
            "The untouched model prompted zero-shot (in the run's prompt format, and in the other where auto chose "
            "chat), lead-k (the document's first k sentences or lines, no model), few-shot (the untouched model shown "
            "training examples); loss is – where a baseline has none.", *([""] + notes if notes else []), ""]
def _kept_note(method: dict) -> list[str]:
    """Where keep_best gave the result another step's weights than the last: say which, for every run of it."""
    notes = []
    for run in seed_runs(method) or [method]:
        t = run["training"]
        if "weights_step" in t and t["weights_step"] != t["steps"]:
            seed = f"seed {run['seed']}: " if "seed" in run and seed_runs(method) else ""
            notes.append(f"{seed}step {t['weights_step']} of {t['steps']}")
    if not notes:
        return []
    return [f"\"after\" scores the weights of the best validation point (train.keep_best), not of the last step: "
            f"{'; '.join(notes)}.", ""]


def _results(results: dict) -> list[str]:
    base = results["baseline"] or {}
    keys = [k for k, _ in ROUGE]
    lines: list[str] = []
    for name, m in results["methods"].items():
        rows = [[f"before / {split}", *_cells(base.get(split), keys)] for split in ("train", "eval")]
        rows += [[f"after / {split}", *_after_cells(m, split, keys)] for split in ("train", "eval")]
        lines += [f"### {_label(name, m)}", "", *table(["", "Loss", "ROUGE-1", "ROUGE-2", "ROUGE-L"], rows), "",
                  *_kept_note(m)]
    before = results["baselines"].get(ZERO_SHOT, {}).get("label", BEFORE)
    lines += ["ROUGE: F1 × 100 as mean ± half the width of the 95% bootstrap interval. Loss: mean cross-entropy "
              f"(nats) per summary token. \"before\" is the {before}, shared by all methods.", ""]
    if any(seed_runs(m) for m in results["methods"].values()):
        lines += ["For a method trained with several seeds, \"after\" shows loss and ROUGE as mean ± sample standard "
                  "deviation (ddof=1) over its seeds instead.", ""]
    lines += _baselines_table(results)
    keys += ["rougeLsum"]
    rows = [[b["label"], *_cells(b["eval"], keys)] for b in results["baselines"].values()]
    rows += [[_label(n, m), *_after_cells(m, "eval", keys)] for n, m in results["methods"].items()]
    labels = [label for _, label in ROUGE] + ["ROUGE-Lsum"]
    lines += ["### All methods and baselines, eval split", "", *table(["Method", "Loss", *labels], rows), "",
              f"Eval split: {results['data']['eval_examples']} examples; same formats as above."]
    per_seed = _per_seed(results)
    return lines + ["", *per_seed] if per_seed else lines


def _test_rows(results: dict, tests: dict) -> list[list[str]]:
    samples, labels = samples_of(results), dict(ROUGE)
    return [[f"{_name(results, a)} − {_name(results, b)}", labels[key], signed(t["diff"]),
             f"{signed(t['low'])} to {signed(t['high'])}",
             DASH if t["p_value"] is None else p_value(t["p_value"], samples).removeprefix("= "),
             DASH if t["p_value"] is None else p_value(t["p_holm"], samples).removeprefix("= "),
             DASH if t["resolvable"] is None else f"±{t['resolvable']:.1f}",
             "not tested" if t["p_value"] is None else "significant" if significant(t) else "not significant"]
            for (a, b, key), t in tests.items()]


def _significance(results: dict, tests: dict) -> list[str]:
    if not tests:
        return ["No paired tests: they need per-document eval scores for two models (the untouched one counts), "
                "which these results do not have (results from older peftsum versions never do). The Verdict "
                "compares 95% intervals instead."]
    header = ["Pair", "Metric", "Difference", "95% interval", "p-value", "Holm p", "Resolvable", "Verdict"]
    methods = set(results["methods"])
    between = {k: t for k, t in tests.items() if k[0] in methods and (k[1] in methods or k[1] == BEFORE)}
    others = {k: t for k, t in tests.items() if k not in between}
    lines = [*table(header, _test_rows(results, between))]
    if others:
        lines += ["", "Against the other baselines:", "", *table(header, _test_rows(results, others))]
    lines += ["", "Difference: first minus second, in mean F1 × 100 on the eval split; interval and p-value "
              "(two-sided) from the paired bootstrap described in the Verdict; Holm p adjusted over the test's family "
              "(the verdict's tests, or the tables' other tests); resolvable: the smallest difference these "
              "documents find at 5% with 80% power."]
    multi = [n for n, m in results["methods"].items() if seed_runs(m)]
    if multi:
        lines.append(f"For {', '.join(multi)} (several seeds), each document's score is the mean of its seeds' scores "
                     "for that document.")
    return lines


def _resources(results: dict) -> list[str]:
    rows = []
    for name, m in results["methods"].items():
        p, t = m["params"], m["training"]
        epochs = epochs_done(t)
        seconds = sum(e["seconds"] for e in t["epochs"])
        rows.append([name, f"{p['total']:,}", f"{p['trainable']:,}", sig4(p["trainable_percent"]),
                     fmt(t["steps"], ","), f"{epochs:.2f}", fmt(seconds / epochs if epochs else None, ".1f"),
                     fmt(t["tokens_per_s"], ",.0f"), fmt(t["peak_memory_mb"], ",.0f")])
    header = ["Method", "Total params", "Trainable params", "% trainable", "Steps", "Epochs", "Time per epoch (s)",
              "Tokens/s", "Peak memory (MB)"]
    notes = [f"- **{n}**: {m['params']['description']}" for n, m in results["methods"].items()]
    budget = _budget(results)
    return [*([budget, ""] if budget else []), *table(header, rows), "",
            "Epochs count a partial last epoch by its share of batches; time per epoch is training time divided by "
            f"epochs. Peak memory is {DASH} where the device does not report it.", "", *notes]


def _speed(results: dict) -> str:
    """How training and generation ran: compiled or not (train.compile auto decides per run), int8 or not."""
    known = {n: m["training"]["compiled"] for n, m in results["methods"].items() if "compiled" in m["training"]}
    compiled = [n for n, c in known.items() if c]
    training = (f"compiled blocks for {', '.join(compiled)}" if compiled else "plain blocks") if known else DASH
    int8 = results["config"]["eval"].get("quantize") == "int8"
    generation = ("int8 matmuls for the linear layers, activations quantized per token (eval.quantize int8)" if int8
                  else "in the training precision")
    setting = results["config"]["train"].get("compile")
    return f"- **Speed settings**: training with {training} (train.compile {setting}); generation {generation}"
def _prompt_line(prompt: dict) -> str:
    chosen = " (data.format auto: the tokenizer has a chat template)" if prompt["chosen"] == "auto" else ""
    if prompt["format"] == "chat":
        system = f", system message {prompt['system']!r}" if prompt.get("system") else ""
        return (f"- **Prompt**: chat format{chosen}: the tokenizer's chat template, user turn "
                f"{prompt['instruction']!r} and the document{system}; a summary ends with {prompt['end_of_turn']!r}")
    chosen = " (data.format auto: the tokenizer has no chat template)" if prompt["chosen"] == "auto" else ""
    return f"- **Prompt**: plain format{chosen}: template {prompt['template']!r}, the summary then EOS"
def _validated_runs(results: dict) -> list[tuple[str, dict]]:
    """(label, training facts) of every run that validated during training, per seed where there are several."""
    out = []
    for name, m in results["methods"].items():
        for run in seed_runs(m) or [m]:
            if "validation" in run["training"]:
                label = f"{name} (seed {run['seed']})" if seed_runs(m) else name
                out.append((label, run["training"]))
    return out


def _validation(results: dict) -> list[str]:
    """What validation during training found: the subset, the schedule, and per run its best point and outcome."""
    validated = _validated_runs(results)
    if not validated:
        return []
    train, data = results["config"]["train"], results["data"]
    overlap = data.get("validation_overlap", 0)
    apart = (f"{overlap} of them also among the {data['eval_examples']} scored eval examples (the eval split is too "
             f"short to keep them apart)" if overlap else
             f"apart from the {data['eval_examples']} scored eval examples")
    rouge = " and ROUGE of summaries generated as for the eval split" if train["eval_rouge"] else ""
    lines = [f"Eval loss{rouge} on {data.get('validation_examples', DASH)} examples of the eval split ({apart}), "
             f"every {train['eval_every']} steps and at the last step; validation time is not training time."]
    if train["early_stopping_patience"]:
        lines[0] += (f" Early stopping: a run stops once {train['early_stopping_patience']} points in a row have "
                     "not improved on the best.")
    if train["keep_best"]:
        lines[0] += " keep_best: each method's result is the weights of its best point."
    rows = []
    for label, t in validated:
        points, best = t["validation"], t["best_step"]
        best_loss = next((p["loss"] for p in points if p["step"] == best), None)
        rows.append([label, str(len(points)), fmt(best, ","), fmt(best_loss, ".3f"),
                     fmt(points[-1]["loss"] if points else None, ".3f"),
                     f"yes, at step {t['steps']:,}" if t["stopped_early"] else "no",
                     f"step {t['weights_step']:,}" + (" (best)" if t["weights_step"] == best else " (last)")])
    header = ["Run", "Points", "Best step", "Best loss", "Last loss", "Stopped early", "Weights from"]
    return [*lines, "", *table(header, rows), "", "Loss: mean cross-entropy (nats) per summary token of the "
            "validation examples; the points are drawn on the training loss chart."]


def _configuration(results: dict) -> list[str]:
    cfg, env, model, data = results["config"], results["environment"], results["model"], results["data"]
    seeds_word, seeds = _seeds(cfg).split(" ", 1)
    versions = ", ".join(f"{k} {env.get(k, DASH)}" for k in ("python", "torch", "transformers"))
    return [
        f"- **Model**: {model['name']} ({model['architecture']}, {model['total_params']:,} parameters, "
        f"tied embeddings: {'yes' if model['tied_embeddings'] else 'no'})",
        f"- **Data**: {data['source']}, columns `{data['document_column']}` → `{data['summary_column']}`; "
        f"{data['train_examples']} train, {data['train_eval_examples']} train-eval, {data['eval_examples']} eval "
        f"examples; {data['skipped']} rows skipped",
        _prompt_line(results["prompt"]),
        f"- **Hardware**: {env.get('cpu', DASH)}; device {env.get('device', DASH)}, precision "
        f"{env.get('precision', DASH)}, {env.get('threads', DASH)} threads, GPU {env.get('gpu') or DASH}",
        _speed(results),
        f"- **Software**: peftsum {results.get('peftsum_version', DASH)}, {versions}; {env.get('platform', DASH)}",
        f"- **{seeds_word.capitalize()}**: {seeds}; run created {results.get('created', DASH)}",
        "", "Runs are deterministic for a given seed, configuration and machine.", "",
        "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```",
    ]


def render_markdown(results: Results) -> str:
    """Return the full report text for results at the current schema; pure and deterministic (same dict, same
    text)."""
    data = results["data"]
    head = (f"Model **{results['model']['name']}** on **{data['source']}**: {data['train_examples']:,} train / "
            f"{data['eval_examples']:,} eval examples, {_seeds(results['config'])}, "
            f"wall time {duration(results['wall_seconds'])}.")
    budget = _budget(results)
    tests = _tests(results)
    validation = _validation(results)
    lines = ["# peftsum comparison", "", " ".join(answer_sentences(results)), "", head + (f" {budget}" if budget else ""), "",
             "## Verdict", "", *_verdict(results, tests), "", "## Results", "", *_results(results), "",
             "## Significance", "", *_significance(results, tests), "", "## Resources", "", *_resources(results), "",
             *(["## Validation during training", "", *validation, ""] if validation else []),
             "## Plots", "", f"![training loss]({LOSS_PLOT})", "", f"![ROUGE before and after]({ROUGE_PLOT})", "",
             "## Configuration", "", *_configuration(results)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- charts


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(y, np.ones(window) / window, mode="valid")


def loss_figure(results: dict) -> Figure:
    """The training loss of every method (per step and smoothed) with its validation points, where it has them:
    circles on a dashed line, the point whose weights were kept (keep_best) starred."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = validated = False
    for i, (name, m) in enumerate(results["methods"].items()):
        training = m["training"]
        curve = training["loss_curve"]
        if not curve:
            continue
        steps, losses = np.asarray(curve, dtype=float).T
        window = max(1, min(50, len(losses) // 10))  # ~10% of the run: smooths noise, keeps the trend
        ax.plot(steps, losses, color=f"C{i}", alpha=0.25, linewidth=1)
        ax.plot(steps[window - 1:], _moving_average(losses, window), color=f"C{i}", linewidth=2,
                label=f"{name} (moving average of {window})")
        points = training.get("validation") or []
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], color=f"C{i}", linestyle="--",
                    marker="o", markersize=4, label=f"{name} validation loss")
            kept = [p for p in points if p["step"] == training["weights_step"] != training["steps"]]
            for p in kept:
                ax.plot([p["step"]], [p["loss"]], color=f"C{i}", marker="*", markersize=14, linestyle="none",
                        label=f"{name}: weights kept (step {p['step']})")
            validated = True
        drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=ax.transAxes)
    title = "Training loss (faint: per step, bold: moving average" + ("; dashed: validation)" if validated else ")")
    ax.set(xlabel="optimizer step", ylabel=f"{'' if validated else 'training '}loss (nats per summary token)",
           title=title)
    ax.grid(alpha=0.3)
    return fig


def _plot_loss(results: dict, path: Path) -> None:
    loss_figure(results).savefig(path, format="png", dpi=120)


def _plot_rouge(results: dict, path: Path) -> None:
    greys = ("0.45", "0.6", "0.75", "0.85")
    bars = [(b["label"], b["eval"], greys[i % len(greys)], False) for i, b in enumerate(results["baselines"].values())]
    bars += [(n, eval_after(m), f"C{i}", True) for i, (n, m) in enumerate(results["methods"].items())]
    bars = [b for b in bars if b[1] is not None]
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(ROUGE)), 0.8 / max(1, len(bars))
    for j, (label, split, color, trained) in enumerate(bars):
        r = [split["rouge"][k] for k, _ in ROUGE]
        xs = x + (j - (len(bars) - 1) / 2) * width
        means = [v["mean"] for v in r]
        err = [[v["mean"] - v["low"] for v in r], [v["high"] - v["mean"] for v in r]]
        ax.bar(xs, means, width, yerr=err, capsize=3, color=color, label=f"{label} (after)" if trained else label)
        for xi, v in zip(xs, r):  # value above the error bar, so the two never collide
            ax.annotate(f"{v['mean']:.1f}", (xi, v["high"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    if not bars:
        ax.text(0.5, 0.5, "no eval scores", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(bars), 4), frameon=False)
        ax.set_ylim(0, max(1.0, max(s["rouge"][k]["high"] for _, s, _, _ in bars for k, _ in ROUGE)) * 1.12)
    ax.set_xticks(x, [label for _, label in ROUGE])
    ax.set(ylabel="F1 × 100", title=f"ROUGE on the eval split (n = {results['data']['eval_examples']}), "
                                    "error bars: 95% bootstrap interval")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png", dpi=120)


def write_report(results: Results, out_dir: Path) -> Path:
    """Write report.md, report.html, loss_curves.png and rouge.png into out_dir (created if needed); return
    report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / LOSS_PLOT, lambda p: _plot_loss(results, p))
    atomic_write(out_dir / ROUGE_PLOT, lambda p: _plot_rouge(results, p))
    report = out_dir / REPORT
    text = render_markdown(results)
    write_text(report, text)
    write_html(results, out_dir, text)
    return report
