"""`peftsum sweep`: one method's knob over several values, and every method on one chart of trainable parameters
against eval ROUGE (a Pareto view: which method buys the most ROUGE per trained parameter).

Each point is an ordinary one-method comparison (`compare`) in its own folder, `<out>/<method>/<leaf>-<value>`; a
method without a --vary runs once at its configured settings, in `<out>/<method>/configured`. The untouched model is
scored once for the whole sweep, in `<out>/baseline`, not at every point. Because every point is a comparison, a sweep
resumes as one does: finished points are read back, not retrained.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

# A Figure without pyplot renders headless and leaves the user's global matplotlib backend alone.
from matplotlib.figure import Figure

from ..config import RunConfig, _apply, _convert, _field_type, validate
from ..errors import UserError
from ..infra.files import atomic_write, write_json, write_text
from ..infra.runs import BASELINE
from ..methods.registry import NAMES
from .compare import compare

METRICS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
CONFIGURED = "configured"  # folder and table label of a method run once at its configured settings
UNTOUCHED = "untouched model"
DASH = "–"


@dataclass
class Vary:
    """One --vary: a method's config key and the values it takes, converted to the key's type."""

    key: str  # "section.field", e.g. "lora.rank"; the section names the method
    values: list

    @property
    def method(self) -> str:
        return self.key.split(".")[0]

    @property
    def leaf(self) -> str:
        return self.key.split(".")[1]


@dataclass
class Point:
    """One comparison of the sweep: a method, the setting it varies (key None: configured settings), its config."""

    method: str
    key: str | None
    value: object
    folder: str  # relative to the sweep's output folder
    cfg: RunConfig


# ---------------------------------------------------------------- --vary, checked before anything trains


def _scalar_type(tp):
    """int, float, bool or str for a one-value key (None allowed or not); None for a list, which commas would split."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if tp in (int, float, bool, str) else None


def parse_vary(text: str) -> Vary:
    """`KEY=V1,V2,...` as a Vary, or a one-line UserError naming what is wrong."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep:
        raise UserError(f"--vary {text!r}: expected KEY=V1,V2,... such as lora.rank=4,8,16")
    section, _, leaf = key.partition(".")
    if section not in NAMES or not leaf:
        raise UserError(f"--vary {key!r}: choose a key of a method's section "
                        f"({', '.join(m + '.*' for m in NAMES)}), such as lora.rank or prompt.num_virtual_tokens")
    names = {f.name for f in dataclasses.fields(_field_type(RunConfig, section))}
    if leaf not in names:
        raise UserError(f"--vary: unknown config key {key!r}; known in {section}: {', '.join(sorted(names))}")
    tp = _scalar_type(_field_type(_field_type(RunConfig, section), leaf))
    if tp is None:
        raise UserError(f"--vary {key}: it holds a list, which cannot be swept; choose a key with one value")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise UserError(f"--vary {key}: no values given; write {key}=V1,V2,...")
    converted = [_convert(v, tp, f"--vary {key}") for v in items]
    repeated = sorted({_text(v) for v in converted if converted.count(v) > 1})
    if repeated:
        raise UserError(f"--vary {key}: {', '.join(repeated)} given more than once")
    return Vary(key, converted)


def parse_varies(texts: list[str], methods: list[str]) -> list[Vary]:
    """Every --vary, checked against each other and against the methods that run."""
    varies = [parse_vary(t) for t in texts]
    keys = [v.key for v in varies]
    for v in varies:
        if keys.count(v.key) > 1:
            raise UserError(f"--vary {v.key} is given twice; list all its values in one --vary")
        if v.method not in methods:
            raise UserError(f"--vary {v.key} sweeps {v.method}, which is not among the methods run "
                            f"({', '.join(methods)}); add it to --methods")
    return varies


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _safe(name: str) -> str:
    """A folder name any file system takes (values may be free text, e.g. prompt.init_text)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _point(cfg: RunConfig, method: str, key: str | None, value, name: str) -> Point:
    point = copy.deepcopy(cfg)
    if key is not None:
        _apply(point, {method: {key.split(".")[1]: value}})
    folder = f"{method}/{_safe(name)}"
    point.methods = [method]
    point.out = str(Path(cfg.out) / folder)
    point.eval.before = False  # the untouched model is scored once for the whole sweep, not at every point
    try:
        validate(point)  # a value can break a rule that ties keys together (num_virtual_tokens vs max_length)
    except UserError as error:
        if key is None:
            raise
        raise UserError(f"--vary {key}={_text(value)}: {error}") from None
    return Point(method, key, value, folder, point)


def plan_points(cfg: RunConfig, varies: list[Vary]) -> list[Point]:
    """Every point of the sweep, in method order: the varied values, or one point at the configured settings."""
    if not cfg.data.eval_size:
        raise UserError("data.eval_size is 0: a sweep ranks its points by eval ROUGE; give --eval-size N")
    points = []
    for method in cfg.methods:
        mine = [v for v in varies if v.method == method]
        if not mine:
            points.append(_point(cfg, method, None, None, CONFIGURED))
        for v in mine:
            points += [_point(cfg, method, v.key, value, f"{v.leaf}-{_text(value)}") for value in v.values]
    folders = [p.folder for p in points]
    for p in points:
        if folders.count(p.folder) > 1:
            raise UserError(f"--vary {p.key}: two of its values share the folder {p.folder}; give values that "
                            f"differ within six significant digits")
    return points


# ---------------------------------------------------------------- results: records, Pareto front, table


def _scores(split: dict) -> dict:
    return {"eval_loss": split["loss"], **{k: split["rouge"][k]["mean"] for k in METRICS}}


def point_record(point: Point, method: dict) -> dict:
    """One row of sweep.json from a point's entry in its results.json."""
    return {"method": point.method, "key": point.key, "value": point.value,
            "trainable_params": method["params"]["trainable"], "total_params": method["params"]["total"],
            **_scores(method["after"]["eval"]), "train_seconds": method["training"]["seconds"],
            "tokens_per_s": method["training"]["tokens_per_s"], "folder": point.folder}


def pareto_front(points: list[dict], metric: str) -> list[bool]:
    """For each point, whether no other point has fewer-or-equal trainable parameters and a higher-or-equal
    `metric`, one of the two strictly (equal points do not dominate each other: both stay on the front)."""
    def dominates(q: dict, p: dict) -> bool:
        fewer, better = q["trainable_params"], q[metric]
        return (fewer <= p["trainable_params"] and better >= p[metric]
                and (fewer < p["trainable_params"] or better > p[metric]))

    return [not any(dominates(q, p) for q in points) for p in points]


def _order(point: dict) -> tuple:
    # The configured point of a method is its only point, so its value (None) is never compared with another.
    return NAMES.index(point["method"]), point["key"] or "", point["value"] if point["key"] else 0


def sweep_table(points: list[dict], metric: str) -> list[str]:
    """The markdown table of all points, by method then value, with the Pareto front marked."""
    front = pareto_front(points, metric)
    header = ["Method", "Key", "Value", "Trainable params", "Eval loss", *METRICS.values(), "Train time (s)",
              "Tokens/s", f"Pareto ({METRICS[metric]})"]
    rows = []
    for p, on in sorted(zip(points, front), key=lambda pair: _order(pair[0])):
        rows.append([p["method"], p["key"] or DASH, _text(p["value"]) if p["key"] else CONFIGURED,
                     f"{p['trainable_params']:,}", f"{p['eval_loss']:.3f}", *(f"{p[k]:.1f}" for k in METRICS),
                     f"{p['train_seconds']:.1f}", f"{p['tokens_per_s']:,.0f}", "yes" if on else ""])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_sweep_markdown(points: list[dict], metric: str, baseline: dict | None = None) -> str:
    """The sweep's report text; pure (same points, same text)."""
    label = METRICS[metric]
    if baseline is None:
        untouched = "The untouched model was not scored (eval.before is false)."
    else:
        untouched = f"The {UNTOUCHED} scores eval loss {baseline['eval_loss']:.3f}, {label} {baseline[metric]:.1f}."
    lines = ["# peftsum sweep", "", f"Trainable parameters against eval {label}, every method on one chart.", "",
             *sweep_table(points, metric), "",
             f"ROUGE: eval F1 × 100 (mean). Pareto: no other point reaches a higher-or-equal {label} with "
             "fewer-or-equal trainable parameters. Each point's full report is in its folder.", "", untouched, "",
             f"![trainable parameters against {label}](pareto.png)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- chart and files


def _plot_pareto(points: list[dict], metric: str, baseline: dict | None, path: Path) -> None:
    label = METRICS[metric]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, method in enumerate(NAMES):  # a method keeps its colour from sweep to sweep
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        keys = sorted({p["key"] for p in mine if p["key"]})
        ax.scatter([p["trainable_params"] for p in mine], [p[metric] for p in mine], color=f"C{i}", zorder=3,
                   label=f"{method} ({', '.join(keys) or CONFIGURED})")
        for p in mine:
            if p["key"]:
                ax.annotate(_text(p["value"]), (p["trainable_params"], p[metric]), xytext=(4, 4),
                            textcoords="offset points", fontsize=8)
    front = sorted((p for p, on in zip(points, pareto_front(points, metric)) if on),
                   key=lambda p: (p["trainable_params"], p[metric]))
    # "post": between two front points, the best reachable score is the one of the smaller point.
    ax.step([p["trainable_params"] for p in front], [p[metric] for p in front], where="post", color="0.3",
            linewidth=1, zorder=2, label="Pareto front")
    if baseline is not None:
        ax.axhline(baseline[metric], color="0.5", linestyle="--", label=UNTOUCHED)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log scale)", ylabel=f"eval {label} (F1 × 100)",
           title=f"Trainable parameters against eval {label}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, format="png", dpi=120)


def write_sweep(sweep: dict, out: Path) -> None:
    """sweep.json, sweep.md and pareto.png into `out`."""
    points, metric, baseline = sweep["points"], sweep["metric"], sweep["baseline"]
    write_json(out / "sweep.json", sweep)
    write_text(out / "sweep.md", render_sweep_markdown(points, metric, baseline))
    atomic_write(out / "pareto.png", lambda p: _plot_pareto(points, metric, baseline, p))


def run_sweep(cfg: RunConfig, varies: list[Vary], metric: str = "rougeL", progress: bool = True,
              resume: bool = False, overwrite: bool = False) -> dict:
    """Run every point of the sweep (one comparison each) into cfg.out, write the sweep's files, return sweep.json's
    content. With `resume`, finished points (and the untouched model's scores) are read back, not recomputed."""
    out = Path(cfg.out)
    points = plan_points(cfg, varies)  # every value is checked before the first point trains
    baseline = None
    if cfg.eval.before:
        # A comparison of no method is exactly "score the untouched model", with compare's resume and overwrite.
        untouched = copy.deepcopy(cfg)
        untouched.methods = []
        untouched.out = str(out / BASELINE)
        baseline = _scores(compare(untouched, progress, resume, overwrite)["baseline"]["eval"])
    records = []
    for n, point in enumerate(points, start=1):
        setting = f"{point.key} = {_text(point.value)}" if point.key else f"{CONFIGURED} settings"
        print(f"sweep point {n}/{len(points)}: {point.method}, {setting} -> {out / point.folder}")
        results = compare(point.cfg, progress, resume, overwrite)
        records.append(point_record(point, results["methods"][point.method]))
    for record, on in zip(records, pareto_front(records, metric)):
        record["pareto"] = on
    sweep = {"metric": metric, "varied": {v.key: v.values for v in varies}, "baseline": baseline, "points": records}
    write_sweep(sweep, out)
    return sweep
