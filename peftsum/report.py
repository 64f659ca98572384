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

DASH = "–"
ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))
BEFORE = "untouched model"


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


# ---------------------------------------------------------------- markdown sections


def _verdict(results: dict) -> list[str]:
    methods = results["methods"]
    if not methods:
        return ["- No method was run."]
    baseline_eval = (results.get("baseline") or {}).get("eval")
    scored = {name: _eval_after(m) for name, m in methods.items() if _eval_after(m) is not None}
    lines: list[str] = []
    if len(methods) == 1:
        lines.append(f"- Only one method was run ({next(iter(methods))}), so there is nothing to rank it against.")
    elif len(scored) < 2:
        lines.append("- Fewer than two methods have eval scores, so there is no ranking on the eval split.")
    else:
        by_loss = sorted(scored, key=lambda n: scored[n]["loss"])
        others = ", ".join(f"{n} {scored[n]['loss']:.3f}" for n in by_loss[1:])
        lines.append(f"- **{by_loss[0]}** has the lowest eval loss ({scored[by_loss[0]]['loss']:.3f}; {others}).")
        for key, label in ROUGE:
            first, second = sorted(scored, key=lambda n: -scored[n]["rouge"][key]["mean"])[:2]
            a, b = scored[first]["rouge"][key], scored[second]["rouge"][key]
            if _overlap(a, b):
                lines.append(f"- {first} leads on {label} ({_ci(a)}) but its interval overlaps {second}'s "
                             f"({_ci(b)}): no clear winner.")
            else:
                lines.append(f"- **{first}** wins on {label} ({_ci(a)}), clear of {second} ({_ci(b)}).")
    # "Before training" is the same untouched model for every method, so each is compared with it.
    if baseline_eval is None:
        lines.append("- The untouched model was not scored on the eval split, so there is no before/after comparison.")
    else:
        before = baseline_eval["rouge"]["rouge1"]
        for name in methods:
            if name not in scored:
                lines.append(f"- {name}: no eval scores after training.")
                continue
            after = scored[name]["rouge"]["rouge1"]
            change = "improved" if after["mean"] > before["mean"] else "did not improve"
            noise = "the intervals overlap, so the change is within noise" if _overlap(before, after) \
                else "the intervals do not overlap"
            lines.append(f"- {name} {change} eval ROUGE-1 over the untouched model "
                         f"({_ci(before)} → {_ci(after)}); {noise}.")
    if len(methods) > 1:
        fastest = max(methods, key=lambda n: methods[n]["training"]["tokens_per_s"])
        smallest = min(methods, key=lambda n: methods[n]["params"]["trainable"])
        p = methods[smallest]["params"]
        lines.append(f"- Fastest training: **{fastest}** ({methods[fastest]['training']['tokens_per_s']:,.0f} tokens/s).")
        lines.append(f"- Fewest trainable parameters: **{smallest}** ({p['trainable']:,}, "
                     f"{_sig4(p['trainable_percent'])} % of the model).")
    return lines


def _results(results: dict) -> list[str]:
    base = results.get("baseline") or {}
    lines: list[str] = []
    for name, m in results["methods"].items():
        after = m.get("after") or {}
        rows = [[f"{when} / {split}", _fmt(s["loss"] if s else None, ".3f"), *(_pm(_rouge(s, k)) for k, _ in ROUGE)]
                for when, src in (("before", base), ("after", after)) for split in ("train", "eval")
                for s in [src.get(split)]]
        lines += [f"### {name}", "", *_table(["", "Loss", "ROUGE-1", "ROUGE-2", "ROUGE-L"], rows), ""]
    lines += ["ROUGE: F1 × 100 as mean ± half the width of the 95% bootstrap interval. Loss: mean cross-entropy "
              "(nats) per summary token. \"before\" is the untouched base model, shared by all methods.", ""]
    keys = ROUGE + (("rougeLsum", "ROUGE-Lsum"),)
    pairs = [(BEFORE, base.get("eval"))] + [(n, _eval_after(m)) for n, m in results["methods"].items()]
    rows = [[name, _fmt(s["loss"] if s else None, ".3f"), *(_pm(_rouge(s, k)) for k, _ in keys)] for name, s in pairs]
    lines += ["### All methods, eval split", "", *_table(["Method", "Loss", *(label for _, label in keys)], rows), "",
              f"Eval split: {results['data']['eval_examples']} examples; same formats as above."]
    return lines


def _resources(results: dict) -> list[str]:
    rows = []
    for name, m in results["methods"].items():
        p, t = m["params"], m["training"]
        epochs = [e["seconds"] for e in t.get("epochs") or []]
        rows.append([name, f"{p['total']:,}", f"{p['trainable']:,}", _sig4(p["trainable_percent"]),
                     _fmt(sum(epochs) / len(epochs) if epochs else None, ".1f"), _fmt(t["tokens_per_s"], ",.0f"),
                     _fmt(t.get("peak_memory_mb"), ",.0f")])
    header = ["Method", "Total params", "Trainable params", "% trainable", "Time per epoch (s)", "Tokens/s",
              "Peak memory (MB)"]
    notes = [f"- **{n}**: {m['params']['description']}" for n, m in results["methods"].items()]
    return [*_table(header, rows), "", "Time per epoch is the mean over epochs; peak memory is "
            f"{DASH} where the device does not report it.", "", *notes]


def _configuration(results: dict) -> list[str]:
    cfg, env, model, data = results["config"], results["environment"], results["model"], results["data"]
    seed = (cfg.get("train") or {}).get("seed")
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
        f"- **Seed**: {_fmt(seed, '')}; run created {results.get('created', DASH)}",
        "", "Runs are deterministic for a given seed, configuration and machine.", "",
        "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```",
    ]


def render_markdown(results: dict) -> str:
    """Return the full report text for a results dict; pure and deterministic (same dict, same text)."""
    data, cfg = results["data"], results["config"]
    seed = (cfg.get("train") or {}).get("seed")
    head = (f"Model **{results['model']['name']}** on **{data['source']}**: {data['train_examples']:,} train / "
            f"{data['eval_examples']:,} eval examples, seed {_fmt(seed, '')}, wall time {_duration(results['wall_seconds'])}.")
    lines = ["# peftsum comparison", "", head, "", "## Verdict", "", *_verdict(results), "",
             "## Results", "", *_results(results), "", "## Resources", "", *_resources(results), "",
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
    """Write report.md, loss_curves.png and rouge.png into out_dir (created if needed); return the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "loss_curves.png", lambda p: _plot_loss(results, p))
    atomic_write(out_dir / "rouge.png", lambda p: _plot_rouge(results, p))
    report = out_dir / "report.md"
    text = render_markdown(results)
    write_text(report, text)
    return report
