"""Atomic file writing: a reader (or a crash) never sees a half-written report, prediction file or adapter.

Each file is written beside its target, flushed to disk, renamed over the target, and the folder is flushed too:
after a power cut the target holds either the old content or the new, never a prefix of the new.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .errors import UserError


def fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names (what makes a rename durable), to disk."""
    is_dir = Path(path).is_dir()
    if is_dir and not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a folder
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:  # some file systems refuse fsync on folders; their renames are as durable as they get
            raise
    finally:
        os.close(fd)


def make_folder(path: Path) -> None:
    """Create an output folder (and its parents), or say in one line why it cannot be."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {path}: {error.strerror or error}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named by pid rather than mkstemp: mkstemp's 0600 mode would survive the rename and hide the file from others.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        # Without this flush a crash soon after the rename can leave the new name pointing at an empty file.
        fsync(tmp)
        os.replace(tmp, path)
    except OSError as error:  # a full disk or a read-only folder: the user's to fix, not a bug
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def looks_like_path(name: str) -> bool:
    """Whether a model or data name means a local path rather than a hub id ("name" or "owner/name"): it exists on
    disk, starts with ".", "/" or "~", or has more than one slash."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).expanduser().exists())


def read_json(path: Path):
    """A JSON file written by peftsum, or a one-line UserError naming the file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}); delete it or pass --overwrite") from None


def read_text(path: Path) -> str:
    """A UTF-8 text file (a Windows BOM tolerated), or a one-line UserError saying why it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {error.start})") from None


def parse_jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is reported by file and line number."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        rows.append((number, row))
    return rows
