"""Turn a run's results dict (the content of results.json) into report.md plus two PNG charts.

`render_markdown` is pure, so the text can be tested and diffed; `write_report` adds the charts and the file writes.
Every number that may be missing (a skipped split, no baseline, no GPU memory on CPU) renders as "–".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml
# A Figure without pyplot renders headless and leaves the user's global matplotlib backend alone.
from matplotlib.figure import Figure

from .files import atomic_write, write_text
from .metrics import ROUGE_KEYS, paired_bootstrap
from .report_html import write_html

__all__ = ["render_markdown", "seed_summary", "write_report"]

DASH = "–"
MINUS = "−"
ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))
BEFORE = "untouched model"
ALPHA = 0.05  # significance threshold of the paired tests
DEFAULT_SAMPLES = 1000  # EvalConfig's default, for results written before the config recorded it


# ---------------------------------------------------------------- small formatting helpers


def _fmt(x: float | int | None, spec: str) -> str:
    return DASH if x is None else format(x, spec)


def _sig4(x: float | None) -> str:
    """Four significant digits without the scientific notation that "%.4g" gives for tiny shares like 0.00004."""
    if x is None:
        return DASH
    if x == 0:
        return "0"
    return f"{x:.{max(0, 3 - math.floor(math.log10(abs(x))))}f}"


def _pm(r: dict | None) -> str:
    """Table cell: mean ± half the width of the 95% interval."""
    return DASH if r is None else f"{r['mean']:.1f} ± {(r['high'] - r['low']) / 2:.1f}"


def _ci(r: dict) -> str:
    """Prose form, which keeps the interval's asymmetry: mean [low, high]."""
    return f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]"


def _rouge(split: dict | None, key: str) -> dict | None:
    return None if split is None else split["rouge"][key]


def _overlap(a: dict, b: dict) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _eval_after(method: dict) -> dict | None:
    return (method.get("after") or {}).get("eval")


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", MINUS)


def _number(x: float) -> str:
    """800.0 -> "800", 0.5 -> "0.5", 50000 -> "50,000"."""
    return format(x, ",.10g")


def _p_value(p: float, samples: int) -> str:
    # A bootstrap cannot resolve p-values below 1/samples, and three decimals are plenty below that.
    floor = max(0.001, 1 / samples)
    if p < floor:
        return f"< {floor:.2g}"
    return f"= {p:.2f}" if p >= 0.1 else f"= {p:.3f}"


# ---------------------------------------------------------------- seeds, budgets, paired tests


def seed_summary(seed_runs: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1) over seeds of the after-training scores.

    Returns {"n": N, "eval": {"loss": {"mean", "std"}, "rouge1": {"mean", "std"}, ...}, "train": same}; ROUGE keys
    are those of metrics.ROUGE_KEYS, each seed contributing its mean F1 x 100. A split no seed scored is None; with
    a single scored seed the std is None (undefined), not 0.
    """
    after = [run.get("after") or {} for run in seed_runs]
    return {"n": len(seed_runs), "eval": _across_seeds([a.get("eval") for a in after]),
            "train": _across_seeds([a.get("train") for a in after])}


def _across_seeds(splits: list[dict | None]) -> dict | None:
    splits = [s for s in splits if s is not None]
    if not splits:
        return None
    columns = {"loss": [s["loss"] for s in splits]}
    columns.update({k: [s["rouge"][k]["mean"] for s in splits] for k in ROUGE_KEYS})
    return {key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}
            for key, v in columns.items()}


def _seeds(cfg: dict) -> str:
    """"seed 7", or "seeds 7–9" when each method was trained with seeds train.seed, train.seed + 1, ..."""
    seed, n = (cfg.get("train") or {}).get("seed"), cfg.get("seeds") or 1
    return f"seeds {seed}–{seed + n - 1}" if n > 1 and seed is not None else f"seed {_fmt(seed, '')}"


def _seed_runs(method: dict) -> list[dict]:
    """The method's runs when it was trained with several seeds, else [] (one seed reports as before)."""
    runs = method.get("seed_runs") or []
    return runs if len(runs) > 1 else []


def _label(name: str, method: dict) -> str:
    runs = _seed_runs(method)
    return f"{name} ({len(runs)} seeds)" if runs else name


def _eval_mean(method: dict, key: str) -> float:
    """Eval loss or ROUGE mean that ranks the method: over its seeds when it has several."""
    if _seed_runs(method):
        return seed_summary(method["seed_runs"])["eval"][key]["mean"]
    split = _eval_after(method)
    return split["loss"] if key == "loss" else split["rouge"][key]["mean"]


def _epochs_done(training: dict) -> float:
    """Epochs as a decimal: a partial last epoch (a budget ran out) counts by its share of batches."""
    return sum(e["batches"] / e["of_batches"] if e.get("of_batches") else 1.0 for e in training.get("epochs") or [])


def _budget(results: dict) -> str | None:
    train = results["config"].get("train") or {}
    if train.get("budget_seconds"):
        return f"Equal budget: {_number(train['budget_seconds'])} s of training wall-clock per method."
    if train.get("budget_tokens"):
        return f"Equal budget: {_number(train['budget_tokens'])} training tokens per method."
    return None


def _samples(results: dict) -> int:
    samples = (results["config"].get("eval") or {}).get("bootstrap_samples")
    return DEFAULT_SAMPLES if samples is None else int(samples)


def _per_document(split: dict | None, key: str) -> list[float] | None:
    return ((split or {}).get("per_document") or {}).get(key)


def _method_scores(method: dict, key: str) -> list[float] | None:
    """Per-document eval scores; with several seeds, each document's mean over the seeds."""
    runs = _seed_runs(method)
    splits = [(r.get("after") or {}).get("eval") for r in runs] if runs else [_eval_after(method)]
    scores = [_per_document(s, key) for s in splits]
    if any(s is None for s in scores) or len({len(s) for s in scores}) != 1:
        return None
    return list(np.mean(scores, axis=0))


def _scored(results: dict) -> list[str]:
    """Methods with eval scores after training, in run order."""
    return [n for n, m in results["methods"].items() if _eval_after(m) is not None]


def _ranked(results: dict, key: str) -> list[str]:
    """Scored methods, best first: highest eval mean of a ROUGE key, or lowest eval loss for key "loss"."""
    sign = 1 if key == "loss" else -1
    return sorted(_scored(results), key=lambda n: sign * _eval_mean(results["methods"][n], key))


def _pairs(results: dict) -> list[tuple[str, str, str]]:
    """(a, b, key) for every test the report states: leader vs each other method, and each method vs untouched."""
    pairs = []
    for key, _ in ROUGE:
        ranked = _ranked(results, key)
        pairs += [(ranked[0], other, key) for other in ranked[1:]] + [(n, BEFORE, key) for n in ranked]
    return pairs


def _paired_tests(results: dict) -> dict[tuple[str, str, str], dict]:
    """Paired bootstrap of a - b per pair, where both sides have per-document scores on the same documents."""
    baseline = (results.get("baseline") or {}).get("eval")
    samples, tests = _samples(results), {}
    for a, b, key in _pairs(results):
        xs = _method_scores(results["methods"][a], key)
        ys = _per_document(baseline, key) if b == BEFORE else _method_scores(results["methods"][b], key)
        if xs is not None and ys is not None and len(xs) == len(ys):
            tests[(a, b, key)] = paired_bootstrap(xs, ys, samples=samples, seed=0)
    return tests


def _significant(test: dict) -> bool:
    return test["p_value"] < ALPHA  # False for NaN, i.e. when no test was run


def _test_text(test: dict, samples: int, prefix: str = "") -> str:
    """"(95% CI −0.4 to +4.6, p = 0.10): **no significant difference**", or "(not tested)" without resamples."""
    if math.isnan(test["p_value"]):
        return f"({prefix}not tested)"
    interval = f"95% CI {_signed(test['low'])} to {_signed(test['high'])}, p {_p_value(test['p_value'], samples)}"
    return f"({prefix}{interval}): " + ("significant at the 5% level" if _significant(test)
                                        else "**no significant difference**")


# ---------------------------------------------------------------- markdown sections


def _leader_lines(results: dict, tests: dict) -> list[str]:
    """Per ROUGE key: the leader by eval mean against each other method, by paired test or else by intervals."""
    methods, samples = results["methods"], _samples(results)
    lines = []
    for key, label in ROUGE:
        first, *others = _ranked(results, key)
        for other in others:
            test = tests.get((first, other, key))
            if test is not None:
                leader = f"**{first}**" if _significant(test) else first
                lines.append(f"- {leader} leads {other} on {label} by {_signed(test['diff'])} "
                             f"{_test_text(test, samples)}.")
                continue
            # Older results have no per-document scores: only the intervals can be compared.
            a, b = _eval_after(methods[first])["rouge"][key], _eval_after(methods[other])["rouge"][key]
            if _overlap(a, b):
                lines.append(f"- {first} leads on {label} ({_ci(a)}) but its interval overlaps {other}'s "
                             f"({_ci(b)}): no clear winner.")
            else:
                lines.append(f"- **{first}** wins on {label} ({_ci(a)}), clear of {other} ({_ci(b)}).")
    return lines


def _baseline_lines(results: dict, tests: dict) -> list[str]:
    """Each method against the untouched model on ROUGE-1 ("before training" is the same model for every method)."""
    baseline_eval = (results.get("baseline") or {}).get("eval")
    if baseline_eval is None:
        return ["- The untouched model was not scored on the eval split, so there is no before/after comparison."]
    before, lines = baseline_eval["rouge"]["rouge1"], []
    for name, m in results["methods"].items():
        if _eval_after(m) is None:
            lines.append(f"- {name}: no eval scores after training.")
            continue
        after, test = _eval_after(m)["rouge"]["rouge1"], tests.get((name, BEFORE, "rouge1"))
        change = "improved" if _eval_mean(m, "rouge1") > before["mean"] else "did not improve"
        if test is not None:
            difference = f"difference {_signed(test['diff'])}, "
            lines.append(f"- {name} {change} eval ROUGE-1 over the untouched model "
                         f"{_test_text(test, _samples(results), difference)}.")
            continue
        noise = "the intervals overlap, so the change is within noise" if _overlap(before, after) \
            else "the intervals do not overlap"
        lines.append(f"- {name} {change} eval ROUGE-1 over the untouched model "
                     f"({_ci(before)} → {_ci(after)}); {noise}.")
    return lines


def _method_note(results: dict, tests: dict) -> list[str]:
    if not tests:
        return []
    if _samples(results) == 0:
        return ["- No significance tests: eval.bootstrap_samples is 0, so differences are stated untested."]
    n = results["data"]["eval_examples"]
    return [f"- Differences are mean F1 × 100 over the same {n} eval documents, tested with a paired bootstrap "
            f"({_samples(results):,} resamples, seed 0); a difference is significant when p < {ALPHA}."]


def _verdict(results: dict, tests: dict) -> list[str]:
    methods = results["methods"]
    if not methods:
        return ["- No method was run."]
    lines = _method_note(results, tests)
    if len(methods) == 1:
        lines.append(f"- Only one method was run ({next(iter(methods))}), so there is nothing to rank it against.")
    elif len(_scored(results)) < 2:
        lines.append("- Fewer than two methods have eval scores, so there is no ranking on the eval split.")
    else:
        by_loss = _ranked(results, "loss")
        others = ", ".join(f"{n} {_eval_mean(methods[n], 'loss'):.3f}" for n in by_loss[1:])
        lines.append(f"- **{by_loss[0]}** has the lowest eval loss ({_eval_mean(methods[by_loss[0]], 'loss'):.3f}; "
                     f"{others}).")
        lines += _leader_lines(results, tests)
    lines += _baseline_lines(results, tests)
    if len(methods) > 1:
        fastest = max(methods, key=lambda n: methods[n]["training"]["tokens_per_s"])
        smallest = min(methods, key=lambda n: methods[n]["params"]["trainable"])
        p = methods[smallest]["params"]
        lines.append(f"- Fastest training: **{fastest}** ({methods[fastest]['training']['tokens_per_s']:,.0f} tokens/s).")
        lines.append(f"- Fewest trainable parameters: **{smallest}** ({p['trainable']:,}, "
                     f"{_sig4(p['trainable_percent'])} % of the model).")
    return lines


def _cells(split: dict | None, keys: list[str]) -> list[str]:
    """Loss and ROUGE cells of one scored split, ROUGE as mean ± half the 95% interval."""
    return [_fmt(split["loss"] if split else None, ".3f"), *(_pm(_rouge(split, k)) for k in keys)]


def _seed_cells(stats: dict | None, keys: list[str]) -> list[str]:
    """The same cells over several seeds: mean ± sample standard deviation."""
    if stats is None:
        return [DASH] * (1 + len(keys))
    return [f"{stats[k]['mean']:{spec}} ± {_fmt(stats[k]['std'], spec)}"
            for k, spec in [("loss", ".3f"), *((k, ".1f") for k in keys)]]


def _after_cells(method: dict, split: str, keys: list[str]) -> list[str]:
    runs = _seed_runs(method)
    if runs:
        return _seed_cells(seed_summary(runs)[split], keys)
    return _cells((method.get("after") or {}).get(split), keys)


def _per_seed_cells(split: dict | None) -> list[str]:
    if split is None:
        return [DASH] * (1 + len(ROUGE))
    return [f"{split['loss']:.3f}", *(f"{split['rouge'][k]['mean']:.1f}" for k, _ in ROUGE)]


def _per_seed(results: dict) -> list[str]:
    rows = [[name, str(run["seed"]), *_per_seed_cells((run.get("after") or {}).get("eval")),
             _fmt(run["training"].get("steps"), ","), f"{_epochs_done(run['training']):.2f}"]
            for name, m in results["methods"].items() for run in _seed_runs(m)]
    if not rows:
        return []
    header = ["Method", "Seed", "Eval loss", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Steps", "Epochs"]
    return ["### Per seed", "", *_table(header, rows), "", "ROUGE: mean F1 × 100 on the eval split."]


def _results(results: dict) -> list[str]:
    base = results.get("baseline") or {}
    keys = [k for k, _ in ROUGE]
    lines: list[str] = []
    for name, m in results["methods"].items():
        rows = [[f"before / {split}", *_cells(base.get(split), keys)] for split in ("train", "eval")]
        rows += [[f"after / {split}", *_after_cells(m, split, keys)] for split in ("train", "eval")]
        lines += [f"### {_label(name, m)}", "", *_table(["", "Loss", "ROUGE-1", "ROUGE-2", "ROUGE-L"], rows), ""]
    lines += ["ROUGE: F1 × 100 as mean ± half the width of the 95% bootstrap interval. Loss: mean cross-entropy "
              "(nats) per summary token. \"before\" is the untouched base model, shared by all methods.", ""]
    if any(_seed_runs(m) for m in results["methods"].values()):
        lines += ["For a method trained with several seeds, \"after\" shows loss and ROUGE as mean ± sample standard "
                  "deviation (ddof=1) over its seeds instead.", ""]
    keys += ["rougeLsum"]
    rows = [[BEFORE, *_cells(base.get("eval"), keys)]]
    rows += [[_label(n, m), *_after_cells(m, "eval", keys)] for n, m in results["methods"].items()]
    labels = [label for _, label in ROUGE] + ["ROUGE-Lsum"]
    lines += ["### All methods, eval split", "", *_table(["Method", "Loss", *labels], rows), "",
              f"Eval split: {results['data']['eval_examples']} examples; same formats as above."]
    per_seed = _per_seed(results)
    return lines + ["", *per_seed] if per_seed else lines


def _significance(results: dict, tests: dict) -> list[str]:
    if not tests:
        return ["No paired tests: they need per-document eval scores for two models (the untouched one counts), "
                "which these results do not have (results from older peftsum versions never do). The Verdict "
                "compares 95% intervals instead."]
    samples, labels = _samples(results), dict(ROUGE)
    rows = [[f"{a} − {b}", labels[key], _signed(t["diff"]), f"{_signed(t['low'])} to {_signed(t['high'])}",
             DASH if math.isnan(t["p_value"]) else _p_value(t["p_value"], samples).removeprefix("= "),
             "not tested" if math.isnan(t["p_value"]) else "significant" if _significant(t) else "not significant"]
            for (a, b, key), t in tests.items()]
    lines = [*_table(["Pair", "Metric", "Difference", "95% interval", "p-value", "Verdict"], rows), "",
             "Difference: first minus second, in mean F1 × 100 on the eval split; interval and p-value (two-sided) "
             "from the paired bootstrap described in the Verdict."]
    multi = [n for n, m in results["methods"].items() if _seed_runs(m)]
    if multi:
        lines.append(f"For {', '.join(multi)} (several seeds), each document's score is the mean of its seeds' scores "
                     "for that document.")
    return lines


def _resources(results: dict) -> list[str]:
    rows = []
    for name, m in results["methods"].items():
        p, t = m["params"], m["training"]
        epochs = _epochs_done(t)
        seconds = sum(e["seconds"] for e in t.get("epochs") or [])
        rows.append([name, f"{p['total']:,}", f"{p['trainable']:,}", _sig4(p["trainable_percent"]),
                     _fmt(t.get("steps"), ","), f"{epochs:.2f}", _fmt(seconds / epochs if epochs else None, ".1f"),
                     _fmt(t["tokens_per_s"], ",.0f"), _fmt(t.get("peak_memory_mb"), ",.0f")])
    header = ["Method", "Total params", "Trainable params", "% trainable", "Steps", "Epochs", "Time per epoch (s)",
              "Tokens/s", "Peak memory (MB)"]
    notes = [f"- **{n}**: {m['params']['description']}" for n, m in results["methods"].items()]
    budget = _budget(results)
    return [*([budget, ""] if budget else []), *_table(header, rows), "",
            "Epochs count a partial last epoch by its share of batches; time per epoch is training time divided by "
            f"epochs. Peak memory is {DASH} where the device does not report it.", "", *notes]


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
        f"- **Hardware**: {env.get('cpu', DASH)}; device {env.get('device', DASH)}, precision "
        f"{env.get('precision', DASH)}, {env.get('threads', DASH)} threads, GPU {env.get('gpu') or DASH}",
        f"- **Software**: peftsum {results.get('peftsum_version', DASH)}, {versions}; {env.get('platform', DASH)}",
        f"- **{seeds_word.capitalize()}**: {seeds}; run created {results.get('created', DASH)}",
        "", "Runs are deterministic for a given seed, configuration and machine.", "",
        "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```",
    ]


def render_markdown(results: dict) -> str:
    """Return the full report text for a results dict; pure and deterministic (same dict, same text).

    The paired bootstrap tests are seeded (seed 0), so they too give the same text every time.
    """
    data = results["data"]
    head = (f"Model **{results['model']['name']}** on **{data['source']}**: {data['train_examples']:,} train / "
            f"{data['eval_examples']:,} eval examples, {_seeds(results['config'])}, "
            f"wall time {_duration(results['wall_seconds'])}.")
    budget = _budget(results)
    tests = _paired_tests(results)
    lines = ["# peftsum comparison", "", head + (f" {budget}" if budget else ""), "",
             "## Verdict", "", *_verdict(results, tests), "", "## Results", "", *_results(results), "",
             "## Significance", "", *_significance(results, tests), "", "## Resources", "", *_resources(results), "",
             "## Plots", "", "![training loss](loss_curves.png)", "", "![ROUGE before and after](rouge.png)", "",
             "## Configuration", "", *_configuration(results)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- charts


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(y, np.ones(window) / window, mode="valid")


def _plot_loss(results: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for i, (name, m) in enumerate(results["methods"].items()):
        curve = m["training"].get("loss_curve") or []
        if not curve:
            continue
        steps, losses = np.asarray(curve, dtype=float).T
        window = max(1, min(50, len(losses) // 10))  # ~10% of the run: smooths noise, keeps the trend
        ax.plot(steps, losses, color=f"C{i}", alpha=0.25, linewidth=1)
        ax.plot(steps[window - 1:], _moving_average(losses, window), color=f"C{i}", linewidth=2,
                label=f"{name} (moving average of {window})")
        drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats per summary token)",
           title="Training loss (faint: per step, bold: moving average)")
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png", dpi=120)


def _plot_rouge(results: dict, path: Path) -> None:
    base = (results.get("baseline") or {}).get("eval")
    bars = [(BEFORE, base, "0.6")] + [(n, _eval_after(m), f"C{i}") for i, (n, m) in enumerate(results["methods"].items())]
    bars = [b for b in bars if b[1] is not None]
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(ROUGE)), 0.8 / max(1, len(bars))
    for j, (label, split, color) in enumerate(bars):
        r = [split["rouge"][k] for k, _ in ROUGE]
        xs = x + (j - (len(bars) - 1) / 2) * width
        means = [v["mean"] for v in r]
        err = [[v["mean"] - v["low"] for v in r], [v["high"] - v["mean"] for v in r]]
        ax.bar(xs, means, width, yerr=err, capsize=3, color=color, label=label if label == BEFORE else f"{label} (after)")
        for xi, v in zip(xs, r):  # value above the error bar, so the two never collide
            ax.annotate(f"{v['mean']:.1f}", (xi, v["high"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    if not bars:
        ax.text(0.5, 0.5, "no eval scores", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(bars), frameon=False)
        ax.set_ylim(0, max(1.0, max(s["rouge"][k]["high"] for _, s, _ in bars for k, _ in ROUGE)) * 1.12)
    ax.set_xticks(x, [label for _, label in ROUGE])
    ax.set(ylabel="F1 × 100", title=f"ROUGE on the eval split (n = {results['data']['eval_examples']}), "
                                    "error bars: 95% bootstrap interval")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png", dpi=120)


def write_report(results: dict, out_dir: Path) -> Path:
    """Write report.md, report.html, loss_curves.png and rouge.png into out_dir (created if needed); return
    report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "loss_curves.png", lambda p: _plot_loss(results, p))
    atomic_write(out_dir / "rouge.png", lambda p: _plot_rouge(results, p))
    report = out_dir / "report.md"
    text = render_markdown(results)
    write_text(report, text)
    write_html(results, out_dir, text)
    return report
