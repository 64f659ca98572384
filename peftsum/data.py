"""Summarization data: read a split (local JSONL/CSV or the hub), pick seeded subsets, and say what kind of data set
it is (news, one-sentence news, dialogues...) for the defaults that depend on it. prompts.py turns the examples
into tokens.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .errors import UserError
from .files import parse_jsonl, read_text


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

def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in parse_jsonl(read_text(path), path)]


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV ({exc})") from None


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)


def split_file(folder: Path, split: str) -> Path:
    """The file holding `split` in a data folder (train.jsonl, validation.csv, val.jsonl...)."""
    for stem in SPLIT_FILES.get(split, [split]):
        for ext in EXTENSIONS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
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
        raise UserError(f"cannot stream data set {path!r} split {split!r} from the hub: {first} "
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


def _text(value) -> str:
    # Some data sets store a document as a list of sentences.
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)


def load_split(cfg: DataConfig, split: str) -> tuple[list[Example], dict]:
    """All usable rows of a split, plus facts for the report (columns, rows skipped for empty text)."""
    source = Path(cfg.source)
    if source.is_dir():
        path = split_file(source, split)
        rows, where = read_rows(path), str(path)
    elif source.suffix in EXTENSIONS or source.exists():
        raise UserError(f"data source {cfg.source!r} must be a folder holding train/validation files "
                        f"(or a hub data set); for a single file, place it in a folder as train.jsonl")
    else:
        rows, where = _hub_rows(cfg, split), f"{cfg.source} [{split}]"
    if not rows:
        raise UserError(f"{where}: no rows")
    document_column, summary_column = _columns(cfg, rows, where)
    examples, skipped = [], 0
    for index, row in enumerate(rows):
        document, summary = _text(row.get(document_column)).strip(), _text(row.get(summary_column)).strip()
        if not document or not summary:
            skipped += 1
            continue
        references = row.get("references")
        references = [str(r) for r in references] if isinstance(references, list) and references else None
        examples.append(Example(str(row.get("id", index)), document, summary, references))
    info = {"document_column": document_column, "summary_column": summary_column, "skipped": skipped}
    return examples, info


def sample(examples: list[Example], size: int, seed: int, what: str) -> list[Example]:
    """A seeded subset of `size` examples (0 = all, in a seeded order)."""
    if size > len(examples):
        raise UserError(f"{what}: asked for {size} examples but the split has {len(examples)} usable rows")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[: size or len(examples)]]


@dataclass
class Splits:
    train: list[Example]  # what the methods train on
    train_eval: list[Example]  # a subset of `train`, scored for the report's "train" rows
    eval: list[Example]
    info: dict


def load_data(cfg: DataConfig, seed: int) -> Splits:
    train_all, info = load_split(cfg, cfg.train_split)
    eval_all, eval_info = load_split(cfg, cfg.eval_split)
    train = sample(train_all, cfg.train_size, seed, f"data.train_size ({cfg.train_split})")
    train_eval = train[: cfg.train_eval_size]
    if cfg.train_eval_size > len(train):
        raise UserError(f"data.train_eval_size ({cfg.train_eval_size}) exceeds the {len(train)} training examples")
    evaluation = sample(eval_all, cfg.eval_size, seed, f"data.eval_size ({cfg.eval_split})") if cfg.eval_size else []
    info = {"source": cfg.source, **info, "skipped": info["skipped"] + eval_info["skipped"],
            "skipped_by_split": {cfg.train_split: info["skipped"], cfg.eval_split: eval_info["skipped"]},
            "train_examples": len(train), "train_eval_examples": len(train_eval), "eval_examples": len(evaluation)}
    return Splits(train, train_eval, evaluation, info)


def skipped_note(info: dict) -> str | None:
    """One line saying how many rows were dropped for an empty document or summary, or None."""
    if not info["skipped"]:
        return None
    where = ", ".join(f"{n} in {split}" for split, n in info["skipped_by_split"].items() if n)
    return f"skipped {info['skipped']} rows with an empty document or summary ({where})"
