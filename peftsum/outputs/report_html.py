"""report.html: the report of report.md as one self-contained page, plus a browser of the eval documents.

The page needs no network at all: CSS, JavaScript and the charts (the PNGs, as data URIs) are inline, and a
Content-Security-Policy forbids every fetch. Its text is report.md's, converted from the very markdown that
`report.render_markdown` returns, so the two never disagree. The document browser shows, for each eval document,
its text, the reference, every method's and the untouched model's prediction side by side with per-document ROUGE;
its data is one JSON block that the page's script reads.

`render_html` is pure; `browser_data` gathers the documents from a run folder (prediction files, per-document scores
of results.json, the documents from the run's data source) and `write_html` does both and writes the file.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
from importlib import resources
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from ..evaluation.metrics import ROUGE_KEYS, rouge_per_document
from ..infra.files import looks_like_path, parse_jsonl, read_text, write_text

__all__ = ["browser_data", "markdown_to_html", "render_html", "write_html"]

REPORT_HTML = "report.html"
PREDICTIONS = "predictions_eval.jsonl"
BASELINE = "baseline"
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
CHARTS = ("loss_curves.png", "rouge.png")
# Nothing may be fetched: inline styles and scripts, images only as data URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# ---------------------------------------------------------------- report.md's markdown, as HTML


def _inline(text: str) -> str:
    """Escape, then `code` and **bold** (the only inline markup report.md uses)."""
    parts = text.split("`")
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # inside backticks
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _image(line: str, images: dict[str, str]) -> str:
    alt, name = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip()).groups()
    if name not in images:
        return f"<p class=\"missing\">[{html.escape(alt)}: {html.escape(name)} not found]</p>"
    return f"<figure><img alt=\"{html.escape(alt)}\" src=\"{images[name]}\"></figure>"


def markdown_to_html(text: str, images: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(title, HTML) per "## " section of report.md's markdown ("" for what precedes the first).

    Handles what render_markdown writes: headings, pipe tables, bullets, fenced code, images (looked up in
    `images`, file name -> data URI), paragraphs; inline `code` and **bold**. Everything else is escaped text.
    """
    images = images or {}
    sections: list[tuple[str, list[str]]] = [("", [])]
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, out = lines[i], sections[-1][1]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
            continue
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif line.startswith("# "):
            out.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("### "):
            out.append(f"<h3>{_inline(line[4:])}</h3>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            header, rows = _cells(block[0]), [_cells(r) for r in block[2:]]
            head = "".join(f"<th>{_inline(c)}</th>" for c in header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
                       f"<tbody>{body}</tbody></table></div>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif line.startswith("!["):
            out.append(_image(line, images))
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return [(title, "\n".join(body)) for title, body in sections]


# ---------------------------------------------------------------- the documents of a run


def _columns(results: dict) -> list[dict]:
    """One column per scored model: the untouched one, then each method (each seed's run for several seeds).

    Each is {"key", "label", "dir", "split"} where dir is the folder (under the run) of its predictions and split its
    eval scores in results.json.
    """
    columns = []
    base = results.get("baseline") or {}
    if base:
        columns.append({"key": BASELINE, "label": "untouched model", "dir": BASELINE, "split": base.get("eval")})
    for name, method in results["methods"].items():
        runs = method.get("seed_runs") or []
        if len(runs) > 1:
            columns += [{"key": run["dir"], "label": f"{name} · seed {run['seed']}", "dir": run["dir"],
                         "split": (run.get("after") or {}).get("eval")} for run in runs]
        else:
            columns.append({"key": name, "label": name, "dir": method.get("dir", name),
                            "split": (method.get("after") or {}).get("eval")})
    return columns


def _read_predictions(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    return [row for _, row in parse_jsonl(read_text(path), path)]


_DOCUMENTS: dict[str, tuple[list | None, str | None]] = {}  # data settings -> (documents, note), once per process


def eval_documents(config: dict) -> tuple[list | None, str | None]:
    """The run's eval examples read again from its data source, or (None, a note saying why they cannot be).

    Memoised per data settings (and a local folder's file times), since a comparison re-renders its report after
    every method: a hub data set is streamed once per process.
    """
    data = config.get("data") or {}
    seed = (config.get("train") or {}).get("seed", 0)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in data.items() if k in known})
    folder = Path(cfg.source).expanduser()
    if folder.is_dir():
        state = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    elif looks_like_path(cfg.source):
        relative = "" if Path(cfg.source).expanduser().is_absolute() else " (from the current folder)"
        return None, f"the data folder {cfg.source} is no longer there{relative}"
    else:
        state = None
    key = json.dumps([data, seed, state], sort_keys=True, default=str)
    if key not in _DOCUMENTS:
        from ..core.data import load_eval

        try:
            _DOCUMENTS[key] = load_eval(cfg, seed)[0], None
        except UserError as exc:
            _DOCUMENTS[key] = None, str(exc)
    return _DOCUMENTS[key]


def _scores(column: dict, rows: list[dict]) -> tuple[dict[str, list[float]], bool]:
    """Per-document ROUGE of a column: results.json's, else computed now from its predictions (older runs).

    Returns the scores and whether they were computed here.
    """
    stored = (column["split"] or {}).get("per_document") or {}
    if all(len(stored.get(k) or []) == len(rows) for k in ROUGE_KEYS):
        return {k: stored[k] for k in ROUGE_KEYS}, False
    references = [row.get("references") or row.get("reference") or "" for row in rows]
    computed = rouge_per_document([row.get("prediction") or "" for row in rows], references)
    return {k: [round(v, 3) for v in computed[k]] for k in ROUGE_KEYS}, True


def browser_data(results: dict, run_dir: Path) -> dict:
    """The document browser's data: {"metrics", "columns", "documents", "notes"}.

    Each document is {"id", "document" (None when the data is gone), "reference", "references",
    "predictions": {column: text}, "scores": {column: {metric: F1 x 100}}}, in the eval subset's order.
    """
    run_dir = Path(run_dir)
    notes, columns, documents = [], [], []
    for column in _columns(results):
        rows = _read_predictions(run_dir / column["dir"] / PREDICTIONS)
        if rows is None:
            notes.append(f"{column['label']}: no predictions file ({column['dir']}/{PREDICTIONS}).")
            continue
        if not documents:
            documents = [{"id": str(row.get("id")), "document": None, "reference": row.get("reference") or "",
                          "references": row.get("references"), "predictions": {}, "scores": {}} for row in rows]
        if [str(row.get("id")) for row in rows] != [d["id"] for d in documents]:
            notes.append(f"{column['label']}: its predictions are for other documents than the first column's; "
                         "left out.")
            continue
        scores, computed = _scores(column, rows)
        if computed:
            notes.append(f"{column['label']}: per-document ROUGE computed from its predictions file (results.json "
                         "has none).")
        columns.append({"key": column["key"], "label": column["label"]})
        for i, (doc, row) in enumerate(zip(documents, rows)):
            doc["predictions"][column["key"]] = row.get("prediction") or ""
            doc["scores"][column["key"]] = {k: scores[k][i] for k in ROUGE_KEYS}
    if documents:
        texts, why = eval_documents(results.get("config") or {})
        if texts is not None and [e.id for e in texts] != [d["id"] for d in documents]:
            texts, why = None, "the data source now holds other eval documents than the run's"
        if texts is None:
            notes.append(f"Document texts are not shown: {why}.")
        else:
            for doc, example in zip(documents, texts):
                doc["document"] = example.document
    return {"metrics": [[k, METRIC_LABELS[k]] for k in ROUGE_KEYS], "columns": columns, "documents": documents,
            "notes": notes}


# ---------------------------------------------------------------- the page


def _asset(name: str) -> str:
    return resources.files("peftsum").joinpath("assets", name).read_text(encoding="utf-8")


def script_json(data) -> str:
    """JSON that is safe inside <script>: no "<" (so no "</script>" or "<!--"), "&" or ">" appear as themselves."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


DOCUMENTS_SECTION = """<p>Every eval document with its reference and each model's prediction. Click a row to read it;
<kbd>↑</kbd>/<kbd>↓</kbd> move through the rows. Sort by any column; filter to the documents where one model beats
another most; highlight the words a prediction shares with the reference or the document.</p>
<div class="toolbar">
  <label>Search <input id="doc-search" type="search" placeholder="words in any text"></label>
  <label>Score <select id="doc-metric"></select></label>
  <label>Show <select id="doc-filter">
    <option value="all">all documents</option>
    <option value="a">where A beats B, largest gap first</option>
    <option value="b">where B beats A, largest gap first</option>
  </select></label>
  <label>A <select id="doc-a"></select></label>
  <label>B <select id="doc-b"></select></label>
  <button id="doc-swap" type="button" title="swap A and B">⇄</button>
  <label>Highlight against <select id="doc-highlight">
    <option value="reference">the reference</option>
    <option value="document">the document</option>
    <option value="none">nothing</option>
  </select></label>
  <span id="doc-count"></span>
</div>
<div id="doc-notes"></div>
<div class="scroll doc-list"><table id="doc-table"><thead></thead><tbody></tbody></table></div>
<div id="doc-detail"></div>
<p class="legend"><span class="hl-copy">copied span</span> part of a run of 3+ words found in the same order in the
source · <span class="hl-shared">shared word</span> also in the source · <span class="hl-novel">new word</span> not in
the source · <span class="hl-novel hl-name">new name or number</span> a number, or a capitalised word inside a
sentence, that the source does not have (a possible hallucination). Words are compared lower-cased, without
punctuation.</p>"""


def render_html(markdown: str, data: dict, images: dict[str, bytes] | None = None) -> str:
    """The whole page for report.md's markdown, the browser's data (`browser_data`) and the charts (name -> PNG)."""
    uris = {name: _data_uri(png) for name, png in (images or {}).items()}
    sections = markdown_to_html(markdown, uris)
    head, sections = sections[0][1], sections[1:]
    # The documents go before the long configuration block, which closes the page.
    at = next((i for i, (title, _) in enumerate(sections) if title == "Configuration"), len(sections))
    sections.insert(at, ("Documents", DOCUMENTS_SECTION))
    nav = " · ".join(f"<a href=\"#{_slug(t)}\">{html.escape(t)}</a>" for t, _ in sections)
    body = "\n".join(f"<section id=\"{_slug(t)}\"><h2>{html.escape(t)}</h2>\n{s}\n</section>" for t, s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>peftsum report</title>
<style>
{_asset("report.css")}
</style>
</head>
<body>
<header>{head}
<nav>{nav}</nav>
</header>
<main>
{body}
</main>
<script type="application/json" id="doc-data">{script_json(data)}</script>
<script>
{_asset("report.js")}
</script>
</body>
</html>
"""


def write_html(results: dict, out_dir: Path, markdown: str) -> Path:
    """Write report.html into out_dir for results (and report.md's text); the charts are read from out_dir."""
    out_dir = Path(out_dir)
    images = {name: (out_dir / name).read_bytes() for name in CHARTS if (out_dir / name).is_file()}
    path = out_dir / REPORT_HTML
    write_text(path, render_html(markdown, browser_data(results, out_dir), images))
    return path
