"""`summarize`: a trained run, a peft adapter or the base model on new documents, with the run's own model,
prompt format, token budget and generation settings (flags may override them, e.g. `--eval.num_beams 4`).

Documents come from plain-text files (`-` reads standard input) and/or the rows of a JSONL or CSV file (the document
column is recognised as for data, or `--document-column`); all are read and checked before the model loads.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..infra.files import check_writable, decode_text, kind_of, read_text
from .flags import add_config_flags, add_source_flags

STDIN = "-"
DESCRIPTION = ("Summarize plain-text files (- reads standard input) and/or the rows of a JSONL file with a trained run "
               "(its own model, prompt format and generation settings) or an adapter folder.")


@dataclass
class Document:
    id: object  # file name, or the row's id (its 0-based index where it has none)
    text: str


def add_summarize(parser) -> None:
    add_config_flags(parser)
    add_source_flags(parser)
    parser.add_argument("files", nargs="*", metavar="FILE", help="a plain-text document per file; - = stdin")
    parser.add_argument("--input", metavar="FILE",
                        help="JSONL (or CSV) rows with a document column (inferred, or --document-column)")
    parser.add_argument("--output", metavar="FILE",
                        help="write JSONL rows {id, prediction} to FILE (- = stdout) instead of printing")


def summarize(args) -> int:
    from ..infra.files import write_jsonl

    names = list(args.files)
    if names.count(STDIN) > 1:
        raise UserError("standard input (-) can be read only once")
    if not names and not args.input:
        raise UserError("nothing to summarize: give document files (- for standard input) or --input FILE.jsonl")
    if args.output is not None and not args.output.strip():
        raise UserError("--output is empty; give a file name, or - for standard output")
    if args.output and args.output != STDIN:
        inputs = [Path(n) for n in names if n != STDIN] + ([Path(args.input)] if args.input else [])
        _check_output(Path(args.output), inputs)
    documents = [_read_document(n) for n in names]  # read (and checked) before the model loads
    if args.input:
        configured = vars(args).get("data.document_column")
        documents += read_input(Path(args.input), configured, explicit=configured is not None)
    from ..evaluation.evaluate import generate  # torch: once the documents and the output are known to be fine
    from .source import open_source

    cfg, session, adapted = open_source(args)
    cut = _truncated(session.tokenizer, documents, cfg.data, adapted.virtual_tokens)
    if cut:
        print(f"peftsum: note: {cut} of {len(documents)} documents were truncated to fit data.max_length "
              f"({cfg.data.max_length} tokens with the template and the summary's room)", file=sys.stderr)
    predictions = generate(adapted, session.tokenizer, [d.text for d in documents], cfg.data, cfg.eval,
                           session.device, session.dtype, progress=len(documents) > 1, desc="summarize")
    if args.output:
        rows = [{"id": d.id, "prediction": p} for d, p in zip(documents, predictions)]
        if args.output == STDIN:
            sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        else:
            try:
                write_jsonl(Path(args.output), rows)
            except UserError as exc:  # e.g. the disk filled while generating: the summaries are not lost
                sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                raise UserError(f"{exc}; the {len(rows)} summaries went to standard output instead") from None
            print(f"{len(rows)} summaries written to {args.output}", file=sys.stderr)
    elif len(documents) == 1:
        print(predictions[0])
    else:
        print("\n\n".join(f"==> {d.id} <==\n{p}" for d, p in zip(documents, predictions)))
    return 0


def _check_output(output: Path, inputs: list[Path]) -> None:
    """Refuse, before the model loads, an --output that would replace an input or cannot be written."""
    for source in inputs:
        if output.resolve() == source.resolve():
            raise UserError(f"--output {output} is also an input; it would be replaced by the summaries: "
                            f"choose another file")
    kind = kind_of(output)
    if kind not in (None, "a file"):
        raise UserError(f"--output {output} is {kind}; give a file name")
    check_writable(output.parent, "--output", given=output)


def _read_document(name: str) -> Document:
    if name == STDIN:
        text, label = decode_text(sys.stdin.buffer.read(), "<stdin>"), "<stdin>"
    else:
        text, label = read_text(Path(name), "document"), name
    if not text.strip():
        raise UserError(f"{label} is empty")
    return Document(label, text.strip())


def document_column(rows: list[dict], configured: str | None, explicit: bool, where: str) -> str:
    """The column holding the documents: --document-column, else the run's, else a known name (article, document...)."""
    from ..core.data import KNOWN_COLUMNS

    available = list(dict.fromkeys(k for row in rows for k in row))
    if configured and (configured in available or explicit):
        if configured not in available:
            raise UserError(f"{where}: no column {configured!r}; available: {', '.join(available)}")
        return configured
    for column in dict.fromkeys(doc for doc, _ in KNOWN_COLUMNS):
        if column in available:
            return column
    raise UserError(f"{where}: cannot tell which column holds the documents; pass --document-column "
                    f"(available: {', '.join(available)})")


def read_input(path: Path, configured: str | None, explicit: bool) -> list[Document]:
    from ..core.data import EXTENSIONS, read_numbered_rows, text_value

    if path.suffix not in EXTENSIONS:
        raise UserError(f"--input {path}: expected JSONL rows (.jsonl, .json) or CSV (.csv); for a plain-text "
                        f"document pass the file itself: peftsum summarize ... {path}")
    numbered = read_numbered_rows(path)
    if not numbered:
        raise UserError(f"{path}: no rows")
    column = document_column([row for _, row in numbered], configured, explicit, str(path))
    documents = []
    for index, (line, row) in enumerate(numbered):
        text = text_value(row.get(column), f"{path}: line {line}, column {column!r}")
        if not text.strip():
            raise UserError(f"{path}: line {line} has no text in column {column!r}")
        documents.append(Document(row.get("id", index), text.strip()))
    return documents


def _truncated(tokenizer, documents: list[Document], data_cfg, reserved: int) -> int:
    """How many documents the prompt budget cuts."""
    from ..core.prompts import prompt_format

    fmt = prompt_format(tokenizer, data_cfg)
    budget = fmt.budget(data_cfg, reserved=reserved)
    return sum(len(fmt.prompt(d.text, budget)) < len(fmt.prompt(d.text, budget + 10 ** 9)) for d in documents)
