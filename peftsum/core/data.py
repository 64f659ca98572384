"""Summarization data: read a split (local JSONL/CSV or the hub), pick seeded subsets, and say what kind of data set
it is (news, one-sentence news, dialogues...) for the defaults that depend on it. prompts.py turns the examples
into tokens.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from ..infra.files import kind_of, parse_jsonl, read_text, require_file


@dataclass(frozen=True)
class HubPreset:
    path: str
    config: str | None
    document: str
    summary: str


PRESETS = {
    "cnn_dailymail": HubPreset("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "xsum": HubPreset("EdinburghNLP/xsum", None, "document", "summary"),
    "samsum": HubPreset("knkarthick/samsum", None, "dialogue", "summary"),
}
# Column pairs recognised without flags, in order of preference.
KNOWN_COLUMNS = [("article", "highlights"), ("document", "summary"), ("dialogue", "summary"),
                 ("source", "target"), ("text", "summary")]
SPLIT_FILES = {"train": ["train"], "validation": ["validation", "valid", "val", "dev"], "test": ["test"]}
EXTENSIONS = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class Kind:
    """What kind of data set a source is, for the defaults that depend on it (measured: docs/defaults.md)."""

    name: str
    instruction: str  # data.instruction's default: the user turn of the chat format, before the document
    lead_k: int  # eval.lead_k's default: how many leading units the lead baseline copies
    lead_unit: str  # "sentence", or "line" where a document is one turn a line (dialogues)


KINDS = {
    "news": Kind("news", "Summarize this article in three short sentences.", 3, "sentence"),
    "xsum": Kind("xsum", "Summarize this article in one sentence.", 1, "sentence"),
    "dialogue": Kind("dialogue", "Summarize this dialogue in one or two sentences.", 2, "line"),
    "scitldr": Kind("scitldr", "Write a one-sentence TL;DR of this paper.", 1, "sentence"),
    "generic": Kind("generic", "Summarize this text in a few sentences.", 3, "sentence"),
}
# Source names (a preset, a hub id's last part, or a local folder's name) that tell the kind, by substring.
SOURCE_KINDS = (("cnn", "news"), ("dailymail", "news"), ("xsum", "xsum"), ("samsum", "dialogue"),
                ("dialogsum", "dialogue"), ("scitldr", "scitldr"))


def data_kind(source: str) -> Kind:
    """The kind of data set `source` names (cnn_dailymail, ../shared/data/xsum, knkarthick/dialogsum...); "generic"
    for a name that tells nothing."""
    name = Path(source.rstrip("/\\")).name.lower()
    return KINDS[next((kind for key, kind in SOURCE_KINDS if key in name), "generic")]


@dataclass
class Example:
    id: str
    document: str
    summary: str
    references: list[str] | None = None  # all human summaries, where the data set has several


# ---------------------------------------------------------------- reading rows

def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    return parse_jsonl(read_text(path, "data file"), path)


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    # Through read_text, so a byte-order mark (Excel's "CSV UTF-8") never sticks to the first column's name.
    reader = csv.DictReader(io.StringIO(read_text(path, "data file"), newline=""))
    rows = []
    try:
        header = reader.fieldnames or []
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # DictReader files the cells beyond the header under None
                raise UserError(f"{path}: line {start} has {len(header) + len(row[None])} fields but the header "
                                f"has {len(header)}")
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV at line {reader.line_num} ({exc})") from None
    return rows


def read_numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a JSONL or CSV file (a CSV row's number is the line it starts on)."""
    return _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)


def read_rows(path: Path) -> list[dict]:
    return [row for _, row in read_numbered_rows(path)]


def split_file(folder: Path, split: str) -> Path:
    """The file holding `split` in a data folder (train.jsonl, validation.csv, val.jsonl...)."""
    for stem in SPLIT_FILES.get(split, [split]):
        for ext in EXTENSIONS:
            path = folder / f"{stem}{ext}"
            if kind_of(path) is not None:
                require_file(path, "data file")  # a folder, a named pipe or a link loop is named as such
                return path
    present = sorted(p.name for p in folder.iterdir() if p.suffix in EXTENSIONS)
    raise UserError(f"no {split!r} file in {folder} (looked for {split}.jsonl/.csv); found: {', '.join(present) or 'nothing'}")


def _hub_rows(cfg: DataConfig, split: str) -> list[dict]:
    """Stream the first `hub_stream_limit` rows of a hub split (never the whole set)."""
    preset = PRESETS.get(cfg.source)
    path = preset.path if preset else cfg.source
    config = cfg.hub_config or (preset.config if preset else None)
    try:
        import datasets

        stream = datasets.load_dataset(path, config, split=split, streaming=True)
        return [dict(row) for row, _ in zip(stream, range(cfg.hub_stream_limit))]
    except Exception as exc:  # the hub raises many types (connection, missing config, missing split)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A relative folder name (configs/demo.yaml's demo/cnn_dailymail) read from another working directory lands
        # here too: say that no such folder was found, not only that the hub failed.
        nowhere = "" if preset else f"; there is no folder {path!r} under {Path.cwd()} either"
        raise UserError(f"cannot stream data set {path!r} split {split!r} from the hub: {first}{nowhere} "
                        f"(for offline use pass a local folder with train/validation JSONL)") from None


def _columns(cfg: DataConfig, rows: list[dict], where: str) -> tuple[str, str]:
    available = list(rows[0].keys()) if rows else []
    preset = PRESETS.get(cfg.source)
    document, summary = cfg.document_column, cfg.summary_column
    if document is None or summary is None:
        pairs = [(preset.document, preset.summary)] if preset else []
        for doc, summ in pairs + KNOWN_COLUMNS:
            if doc in available and summ in available:
                document, summary = document or doc, summary or summ
                break
    for flag, column in (("--document-column", document), ("--summary-column", summary)):
        if column is None:
            raise UserError(f"{where}: cannot tell which column holds the text; pass {flag} "
                            f"(available: {', '.join(available)})")
        if column not in available:
            raise UserError(f"{where}: no column {column!r}; available: {', '.join(available)}")
    return document, summary


def text_value(value, where: str) -> str:
    """A cell as text: a string, a list of strings (some data sets store a document as its sentences), or a number.

    Anything else (a JSON object, a list holding other things, a boolean) is refused: its Python repr is not text
    anyone wrote, and training on it (or scoring against it) would be silently wrong.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = ("a JSON object" if isinstance(value, dict) else "a list holding non-text items" if isinstance(value, list)
            else "a boolean" if isinstance(value, bool) else type(value).__name__)
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise UserError(f"{where}: expected text (a string or a list of strings), got {kind}: {shown}")


def load_split(cfg: DataConfig, split: str) -> tuple[list[Example], dict]:
    """All usable rows of a split, plus facts for the report (columns, rows skipped for empty text)."""
    source = Path(cfg.source)
    kind = kind_of(source)
    if kind == "a folder":
        path = split_file(source, split)
        numbered, where = read_numbered_rows(path), str(path)
        label = "line"
    elif kind is not None or source.suffix in EXTENSIONS:
        single = "; for a single file, place it in a folder as train.jsonl" if kind in ("a file", None) else ""
        raise UserError(f"data source {cfg.source!r} is {kind or 'not there'}: it must be a folder holding "
                        f"train/validation files (or a hub data set){single}")
    else:
        numbered, where = list(enumerate(_hub_rows(cfg, split), start=1)), f"{cfg.source} [{split}]"
        label = "row"
    if not numbered:
        raise UserError(f"{where}: no rows")
    rows = [row for _, row in numbered]
    document_column, summary_column = _columns(cfg, rows, where)
    examples, skipped = [], 0
    for index, (number, row) in enumerate(numbered):
        at = f"{where}: {label} {number}, column"
        document = text_value(row.get(document_column), f"{at} {document_column!r}").strip()
        summary = text_value(row.get(summary_column), f"{at} {summary_column!r}").strip()
        if not document or not summary:
            skipped += 1
            continue
        references = row.get("references")
        if isinstance(references, list) and references:
            references = [text_value(r, f"{at} 'references'") for r in references]
        else:
            references = None
        examples.append(Example(str(row.get("id", index)), document, summary, references))
    info = {"document_column": document_column, "summary_column": summary_column, "skipped": skipped}
    return examples, info


def _seeded_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def sample(examples: list[Example], size: int, seed: int, what: str) -> list[Example]:
    """A seeded subset of `size` examples (0 = all, in a seeded order)."""
    if size > len(examples):
        raise UserError(f"{what}: asked for {size} examples but the split has {len(examples)} usable rows")
    return [examples[i] for i in _seeded_order(len(examples), seed)[: size or len(examples)]]


def validation_subset(examples: list[Example], scored: int, size: int, seed: int) -> tuple[list[Example], int]:
    """`size` examples of the eval split for validation during training, and how many of them are also scored.

    The scored eval subset is the first `scored` of a seeded order of the split (`sample`); validation takes the
    next `size` of the same order, so the two are disjoint and the scored subset is the one it would be without
    validation. Where the split is too short for both, validation is topped up from the scored subset: the caller
    reports that overlap, it is never silent.
    """
    if size > len(examples):
        raise UserError(f"train.eval_size: asked for {size} validation examples but the eval split has "
                        f"{len(examples)} usable rows")
    order = _seeded_order(len(examples), seed)
    chosen = order[scored:scored + size]
    overlap = size - len(chosen)
    return [examples[i] for i in chosen + order[:overlap]], overlap


@dataclass
class Splits:
    train: list[Example]  # what the methods train on
    train_eval: list[Example]  # a subset of `train`, scored for the report's "train" rows
    eval: list[Example]
    info: dict
    validation: list[Example] = field(default_factory=list)  # validation during training (train.eval_size)


def _scored_eval(cfg: DataConfig, eval_all: list[Example], seed: int) -> list[Example]:
    return sample(eval_all, cfg.eval_size, seed, f"data.eval_size ({cfg.eval_split})") if cfg.eval_size else []


def load_eval(cfg: DataConfig, seed: int) -> tuple[list[Example], dict]:
    """The seeded eval subset alone (what load_data gives as Splits.eval), plus the eval split's facts.

    For readers of a finished run (the HTML report's documents), which need neither the training split nor its cost.
    """
    eval_all, info = load_split(cfg, cfg.eval_split)
    return _scored_eval(cfg, eval_all, seed), info


def load_data(cfg: DataConfig, seed: int, validation_size: int = 0) -> Splits:
    """The training examples, the scored subsets and `validation_size` validation examples (`validation_subset`;
    0: none), with the facts the report states (counts, skipped rows, validation overlap)."""
    train_all, info = load_split(cfg, cfg.train_split)
    eval_all, eval_info = load_split(cfg, cfg.eval_split)
    evaluation = _scored_eval(cfg, eval_all, seed)
    train = sample(train_all, cfg.train_size, seed, f"data.train_size ({cfg.train_split})")
    train_eval = train[: cfg.train_eval_size]
    if cfg.train_eval_size > len(train):
        raise UserError(f"data.train_eval_size ({cfg.train_eval_size}) exceeds the {len(train)} training examples")
    info = {"source": cfg.source, **info, "skipped": info["skipped"] + eval_info["skipped"],
            "skipped_by_split": {cfg.train_split: info["skipped"], cfg.eval_split: eval_info["skipped"]},
            "train_examples": len(train), "train_eval_examples": len(train_eval), "eval_examples": len(evaluation)}
    validation: list[Example] = []
    if validation_size:
        validation, overlap = validation_subset(eval_all, len(evaluation), validation_size, seed)
        info.update(validation_examples=len(validation), validation_overlap=overlap)
    return Splits(train, train_eval, evaluation, info, validation)


def validation_note(info: dict) -> str | None:
    """One line saying that validation examples are also scored eval examples (a short eval split), or None."""
    overlap = info.get("validation_overlap")
    if not overlap:
        return None
    return (f"the eval split is too short for validation examples apart from the {info['eval_examples']} scored "
            f"ones: {overlap} of the {info['validation_examples']} validation examples are also scored")


def skipped_note(info: dict) -> str | None:
    """One line saying how many rows were dropped for an empty document or summary, or None."""
    if not info["skipped"]:
        return None
    where = ", ".join(f"{n} in {split}" for split, n in info["skipped_by_split"].items() if n)
    return f"skipped {info['skipped']} rows with an empty document or summary ({where})"
