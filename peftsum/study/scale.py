"""`peftsum scale`: the same comparison (methods, data, budget, seeds) over several models, and how each method's
scores and the gap between prompt tuning and LoRA move with the model's size.

Each model gets an ordinary comparison (`compare`) in `<out>/<model>/`, with every setting but the model shared, so
the data subsets, the budget and the seeds are the same for all. A model whose comparison finished earlier is read
back from its results.json, not loaded again. `scale.json` holds one record per model, `scale.md` the tables, and
`scale.png` the chart: eval ROUGE-1 and eval loss of each method against total parameters (log scale), and the
prompt-minus-LoRA ROUGE-1 gap with its paired-bootstrap interval.

A token budget makes the models comparable in what they read (each in its own tokenizer's tokens); a time budget
shows what each size costs. Models differ in more than size (family, tokenizer, pretraining data, instruction
tuning): a change across them is a change across these models, and two models are two points, not a trend.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

# A Figure without pyplot renders headless and leaves the user's global matplotlib backend alone.
from matplotlib.figure import Figure

from ..config import RunConfig
from ..errors import UserError
from ..evaluation.metrics import bootstrap_interval, paired_bootstrap
from ..infra import lock, runs
from ..infra.files import atomic_write, write_json, write_text
from .analysis import method_scores, upgrade
from .compare import compare

DASH = "–"
MINUS = "−"
# The gap charted, first minus second: the reference study's question (does prompt tuning close on LoRA as the
# model grows?), a choice of this study rather than knowledge about the methods.
GAP = ("prompt", "lora")


def parse_models(text: str) -> list[str]:
    """`a,b,...` as a list of model names, or a one-line UserError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--models {text!r}: give at least two models, comma-separated (e.g. smollm2-135m,gemma3-270m)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--models: {', '.join(repeated)} given more than once")
    return names


def plan_models(cfg: RunConfig, models: list[str]) -> list[tuple[str, str, RunConfig]]:
    """(model, folder, config) per model: the scale's config with only the model and the output folder changed."""
    if not cfg.data.eval_size:
        raise UserError("data.eval_size is 0: scale compares eval scores across models; give --eval-size N")
    plans = []
    for model in models:
        folder = runs.model_folder(model)
        sub = copy.deepcopy(cfg)
        sub.model.name = model
        sub.out = str(Path(cfg.out) / folder)
        plans.append((model, folder, sub))
    folders = [folder for _, folder, _ in plans]
    for model, folder, _ in plans:
        if folders.count(folder) > 1:
            raise UserError(f"--models: two models share the folder name {folder!r}; rename one of the local folders")
    return plans


# ---------------------------------------------------------------- records: what one model's results.json says


def _runs(method: dict) -> list[dict]:
    """The method's runs: one per seed ({"after", "training", ...}), or the method itself when it ran once."""
    return method.get("seed_runs") or [method]


def _per_document(method: dict, model: str, name: str) -> np.ndarray:
    """Each eval document's ROUGE-1, the mean over the seeds."""
    scores = method_scores(method, "rouge1")
    if scores is None:
        raise UserError(f"the results of {model} ({name}) hold no per-document eval scores; rerun that model "
                        f"with --overwrite")
    return np.asarray(scores, dtype=float)


def _spread(values: list[float]) -> dict:
    """Mean with the range over seeds as its interval (one seed: the value alone)."""
    return {"mean": float(np.mean(values)), "low": float(min(values)), "high": float(max(values))}


def model_record(model: str, folder: str, results: dict, samples: int) -> dict:
    """One model's row of the scale: sizes, each method's eval scores with intervals, the prompt-minus-LoRA gap.

    ROUGE-1 intervals are 95% bootstrap intervals over the eval documents (each document's score the mean over the
    seeds); the eval loss, stored as one mean per run, gets the range over seeds. The gap is a paired bootstrap over
    the same documents.
    """
    methods, documents = {}, {}
    for name, method in results["methods"].items():
        seeds = _runs(method)
        documents[name] = _per_document(method, model, name)
        methods[name] = {
            "trainable_params": method["params"]["trainable"], "seeds": len(seeds),
            "eval_loss": _spread([r["after"]["eval"]["loss"] for r in seeds]),
            "rouge1": bootstrap_interval(documents[name], samples=samples, seed=0),
            "train_seconds": float(np.mean([r["training"]["seconds"] for r in seeds])),
            "tokens": float(np.mean([r["training"]["tokens"] for r in seeds])),
            "tokens_per_s": float(np.mean([r["training"]["tokens_per_s"] for r in seeds])),
            "steps": float(np.mean([r["training"]["steps"] for r in seeds])),
        }
    gap = None
    if all(m in documents for m in GAP):
        gap = paired_bootstrap(documents[GAP[0]], documents[GAP[1]], samples=samples, seed=0)
    baseline = (results.get("baseline") or {}).get("eval")
    env = results.get("environment") or {}
    return {"model": model, "folder": folder, "architecture": results["model"]["architecture"],
            "total_params": results["model"]["total_params"],
            "baseline": None if baseline is None else {"eval_loss": baseline["loss"],
                                                       "rouge1": baseline["rouge"]["rouge1"]["mean"],
                                                       "rouge1_interval": baseline["rouge"]["rouge1"]},
            "methods": methods, "gap": gap, "eval_documents": len(next(iter(documents.values()), [])),
            "hardware": f"{env.get('cpu', DASH)}, {env.get('precision', DASH)}"}


# ---------------------------------------------------------------- tables


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _interval(r: dict, spec: str) -> str:
    return f"{r['mean']:{spec}} [{r['low']:{spec}}, {r['high']:{spec}}]"


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", MINUS)


def _p(p: float, samples: int) -> str:
    floor = max(0.001, 1 / samples) if samples else 0.001
    return DASH if p != p else (f"< {floor:.2g}" if p < floor else f"{p:.3f}")


def scale_table(records: list[dict]) -> list[str]:
    """Every model x method, smallest model first: size, eval loss, eval ROUGE-1 and what the training cost."""
    rows = []
    for r in sorted(records, key=lambda r: r["total_params"]):
        if r["baseline"] is not None:
            interval = r["baseline"].get("rouge1_interval")  # absent from scale records written before it
            rouge = _interval(interval, ".1f") if interval else f"{r['baseline']['rouge1']:.1f}"
            rows.append([r["model"], f"{r['total_params']:,}", "untouched", DASH, f"{r['baseline']['eval_loss']:.3f}",
                         rouge, DASH, DASH, DASH])
        for name, m in r["methods"].items():
            rows.append([r["model"], f"{r['total_params']:,}", name, f"{m['trainable_params']:,}",
                         _interval(m["eval_loss"], ".3f"), _interval(m["rouge1"], ".1f"), f"{m['steps']:,.0f}",
                         f"{m['train_seconds']:,.0f}", f"{m['tokens_per_s']:,.0f}"])
    header = ["Model", "Total params", "Method", "Trainable params", "Eval loss [seed range]",
              "Eval ROUGE-1 [95% CI]", "Steps", "Train time (s)", "Tokens/s"]
    return _table(header, rows)


def gap_table(records: list[dict], samples: int) -> list[str]:
    """The prompt-minus-LoRA ROUGE-1 gap of each model, with its paired-bootstrap interval and p-value."""
    rows = []
    for r in sorted(records, key=lambda r: r["total_params"]):
        g = r["gap"]
        rows.append([r["model"], f"{r['total_params']:,}", DASH if g is None else _signed(g["diff"]),
                     DASH if g is None else f"[{_signed(g['low'])}, {_signed(g['high'])}]",
                     DASH if g is None else _p(g["p_value"], samples)])
    return _table(["Model", "Total params", f"{GAP[0]} {MINUS} {GAP[1]} ROUGE-1", "95% CI (paired)", "p"], rows)


def render_scale_markdown(records: list[dict], cfg: dict) -> str:
    """scale.md's text; pure (same records and config, same text)."""
    train, data = cfg["train"], cfg["data"]
    if train.get("budget_tokens"):
        budget = f"{train['budget_tokens']:,} training tokens per method (each model's own tokens)"
    elif train.get("budget_seconds"):
        budget = f"{train['budget_seconds']:,g} s of training wall-clock per method"
    else:
        budget = f"{train['epochs']} epoch(s) per method"
    seeds = cfg.get("seeds", 1)
    documents = {r["eval_documents"] for r in records}
    lines = ["# peftsum scale", "",
             f"Methods {', '.join(cfg['methods'])} on {data['source']}, {budget}, {seeds} seed(s) from seed "
             f"{train['seed']}; the same {', '.join(map(str, sorted(documents)))} eval documents for every model.",
             "", *scale_table(records), "",
             "Eval loss: mean over seeds (nats per summary token), with the lowest and highest seed. Eval ROUGE-1: "
             "F1 × 100, mean with its 95% bootstrap interval over the eval documents (each document's score the mean "
             "over seeds). Train time and tokens/s: mean over seeds.", ""]
    if all(r["gap"] is None for r in records):
        lines.append(f"No gap: the comparison needs both {GAP[0]} and {GAP[1]} among the methods.")
    else:
        samples = cfg["eval"]["bootstrap_samples"]
        lines += [*gap_table(records, samples), "",
                  f"Gap: mean over the same eval documents of {GAP[0]}'s ROUGE-1 minus {GAP[1]}'s (negative: "
                  f"{GAP[1]} ahead), with the 95% interval and two-sided p-value of a paired bootstrap "
                  f"({samples} resamples)."]
    hardware = sorted({r["hardware"] for r in records})
    lines += ["", f"Hardware: {'; '.join(hardware)}. Each model's full report is in its folder "
              f"({', '.join(r['folder'] + '/' + runs.REPORT for r in records)}).", "",
              "Models differ in more than size (family, tokenizer, pretraining data, instruction tuning), so a change "
              "across them is a change across these models; two models are two points, not a trend.", "",
              f"![scores against model size]({runs.SCALE_PLOT})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- chart and files


def _errorbar(ax, xs, intervals, **style):
    means = [i["mean"] for i in intervals]
    below = [i["mean"] - i["low"] for i in intervals]
    above = [i["high"] - i["mean"] for i in intervals]
    ax.errorbar(xs, means, yerr=[below, above], capsize=4, marker="o", **style)


def plot_scale(records: list[dict], path: Path) -> None:
    """Three panels against total parameters (log scale): eval ROUGE-1, eval loss, and the prompt-minus-LoRA gap."""
    records = sorted(records, key=lambda r: r["total_params"])
    sizes = [r["total_params"] for r in records]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    rouge_ax, loss_ax, gap_ax = fig.subplots(1, 3)
    methods = list(dict.fromkeys(m for r in records for m in r["methods"]))
    for i, method in enumerate(methods):
        mine = [(r["total_params"], r["methods"][method]) for r in records if method in r["methods"]]
        xs = [x for x, _ in mine]
        _errorbar(rouge_ax, xs, [m["rouge1"] for _, m in mine], color=f"C{i}", label=method)
        _errorbar(loss_ax, xs, [m["eval_loss"] for _, m in mine], color=f"C{i}", label=method)
    untouched = [r for r in records if r["baseline"] is not None]
    if untouched:
        xs = [r["total_params"] for r in untouched]
        rouge_ax.plot(xs, [r["baseline"]["rouge1"] for r in untouched], "x--", color="0.5", label="untouched")
        loss_ax.plot(xs, [r["baseline"]["eval_loss"] for r in untouched], "x--", color="0.5", label="untouched")
    gapped = [r for r in records if r["gap"] is not None]
    if gapped:
        _errorbar(gap_ax, [r["total_params"] for r in gapped],
                  [{"mean": r["gap"]["diff"], "low": r["gap"]["low"], "high": r["gap"]["high"]} for r in gapped],
                  color="C3", label="95% CI (paired bootstrap)")
        gap_ax.legend()
    gap_ax.axhline(0, color="0.5", linewidth=1)
    for r in records:
        for ax in (rouge_ax, loss_ax, gap_ax):
            ax.annotate(r["folder"], (r["total_params"], 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                        textcoords="offset points", rotation=90, ha="left", va="bottom", fontsize=8, color="0.4")
    rouge_ax.set(ylabel="eval ROUGE-1 (F1 × 100)", title="Eval ROUGE-1 (95% CI over documents)")
    loss_ax.set(ylabel="eval loss (nats/token)", title="Eval loss (range over seeds)")
    gap_ax.set(ylabel=f"{GAP[0]} {MINUS} {GAP[1]} ROUGE-1", title=f"{GAP[0]} {MINUS} {GAP[1]} gap")
    for ax in (rouge_ax, loss_ax, gap_ax):
        ax.set_xscale("log")
        ax.set_xlabel("total parameters (log scale)")
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
        ax.grid(alpha=0.3, which="both")
    rouge_ax.legend()
    loss_ax.legend()
    fig.savefig(path, format="png", dpi=120)


def write_scale(scale: dict, out: Path) -> None:
    """scale.json, scale.md and scale.png into `out`."""
    write_json(out / runs.SCALE_JSON, scale)
    write_text(out / runs.SCALE_REPORT, render_scale_markdown(scale["models"], scale["config"]))
    atomic_write(out / runs.SCALE_PLOT, lambda p: plot_scale(scale["models"], p))


def run_scale(cfg: RunConfig, models: list[str], resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Run the comparison of `cfg` for every model into cfg.out/<model>, write the scale's files, return scale.json.

    With `resume`, a model whose comparison finished is read back from its results.json (the model is not even
    loaded), and an unfinished one continues as `compare --resume` does. Each model's folder is locked while its
    comparison runs (the command line locks cfg.out itself), so a `compare` aimed at it meanwhile is refused.
    """
    out = Path(cfg.out)
    plans = plan_models(cfg, models)  # every folder is checked before the first model trains
    samples = cfg.eval.bootstrap_samples
    records = []
    for n, (model, folder, sub) in enumerate(plans, start=1):
        results = runs.finished_comparison(out / folder, sub) if resume else None
        if results is not None:
            results = upgrade(results)
            print(f"scale model {n}/{len(plans)}: {model} finished earlier; results read back from "
                  f"{out / folder / runs.RESULTS}")
        else:
            print(f"scale model {n}/{len(plans)}: {model} -> {out / folder}")
            with lock.holding(out / folder):
                results = compare(sub, progress, resume=resume, overwrite=overwrite)
        records.append(model_record(model, folder, results, samples))
    config = cfg.to_dict()
    config["model"] = {**config["model"], "name": None}  # each record names its model
    scale = {"models": records, "config": config}
    write_scale(scale, out)
    return scale
