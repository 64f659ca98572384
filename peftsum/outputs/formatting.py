"""Numbers and tables as the reports write them (report.md, report.html, model cards, sweep and scale tables)."""

from __future__ import annotations

import math

DASH = "–"
MINUS = "−"


def fmt(x: float | int | None, spec: str) -> str:
    return DASH if x is None else format(x, spec)


def sig4(x: float | None) -> str:
    """Four significant digits without the scientific notation that "%.4g" gives for tiny shares like 0.00004."""
    if x is None:
        return DASH
    if x == 0:
        return "0"
    return f"{x:.{max(0, 3 - math.floor(math.log10(abs(x))))}f}"


def pm(r: dict | None) -> str:
    """Table cell: mean ± half the width of the 95% interval."""
    return DASH if r is None else f"{r['mean']:.1f} ± {(r['high'] - r['low']) / 2:.1f}"


def ci(r: dict) -> str:
    """Prose form, which keeps the interval's asymmetry: mean [low, high]."""
    return f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]"


def rouge(split: dict | None, key: str) -> dict | None:
    return None if split is None else split["rouge"][key]


def overlap(a: dict, b: dict) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", MINUS)


def number(x: float) -> str:
    """800.0 -> "800", 0.5 -> "0.5", 50000 -> "50,000"."""
    return format(x, ",.10g")


def p_value(p: float, samples: int) -> str:
    # A bootstrap cannot resolve p-values below 1/samples, and three decimals are plenty below that.
    floor = max(0.001, 1 / samples)
    if p < floor:
        return f"< {floor:.2g}"
    return f"= {p:.2f}" if p >= 0.1 else f"= {p:.3f}"


def epochs_done(training: dict) -> float:
    """Epochs as a decimal: a partial last epoch (a budget ran out) counts by its share of batches."""
    return sum(e["batches"] / e["of_batches"] for e in training["epochs"])
