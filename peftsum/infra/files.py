"""Files in and out, with one-line errors: atomic writes, one text reader, and what a failed read or write means.

Writing: each file is written beside its target, flushed to disk, renamed over the target, and the folder is flushed
too: after a power cut the target holds either the old content or the new, never a prefix of the new. An output
folder is checked before any compute (`check_writable`), so a run never spends its training time only to find that
it cannot save the result; a write that fails later says whether space or permission is missing (`write_problem`).

Reading: every text file (YAML, JSON, JSONL, CSV, documents) goes through `read_text`, which takes UTF-8 with or
without a byte-order mark, and UTF-16/32 with one, and says what a path really is when it is not a regular file (a
folder, a named pipe, a symbolic link loop...). Libraries fail on a damaged file in their own ways (safetensors'
SafetensorError, KeyError on a missing tensor, JSONDecodeError); `damaged` turns them into one UserError naming it.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from ..errors import UserError

# Byte-order marks, longest first (the UTF-32 LE mark begins with the UTF-16 LE one).
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


# ---------------------------------------------------------------- what a path is

def kind_of(path: Path) -> str | None:
    """'a file', 'a folder', 'a named pipe (FIFO)', 'a symbolic link loop'... for `path`; None where nothing is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop"
        if error.errno == errno.ENOTDIR:
            return None  # a parent is a file: nothing can be there
        return f"unreadable ({error.strerror})"
    for test, kind in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def require_file(path: Path, what: str = "file") -> None:
    """Refuse, in one line, a path that is not a regular file, saying what it is instead."""
    kind = kind_of(path)
    if kind is None:
        raise UserError(f"{what} not found: {path}")
    if kind.startswith("unreadable"):
        raise UserError(f"cannot read {path}: {kind[len('unreadable ('):-1]}")
    if kind != "a file":
        raise UserError(f"{path} is {kind}, not a {what}")


# ---------------------------------------------------------------- reading

def decode_text(data: bytes, where: str) -> str:
    """Bytes as text: UTF-8 (a byte-order mark dropped), or UTF-16/32 where a byte-order mark says so."""
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        byte = data[error.start:error.start + 1].hex()
        raise UserError(f"{where} is not {encoding.replace('-sig', '').upper()} text (byte 0x{byte} at offset "
                        f"{error.start}, line {line}); save it as UTF-8") from None


def read_text(path: Path, what: str = "file") -> str:
    """A text file's content (see `decode_text`), or a one-line UserError saying why it cannot be read."""
    require_file(path, what)  # before opening: a named pipe would block the open forever
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    return decode_text(data, str(path))


def read_json(path: Path, advice: str = "delete it or pass --overwrite"):
    """A JSON file, or a one-line UserError naming the file (and `advice`, what the user can do about it)."""
    text = read_text(path)
    with damaged(path, advice):
        return json.loads(text)


def read_tensors(path: Path, advice: str = "", finite: bool = False) -> dict:
    """A safetensors file's tensors (never a pickle), or a one-line UserError naming the file.

    `finite` refuses trained weights holding NaN or inf (see `refuse_non_finite`)."""
    from safetensors.torch import load_file

    require_file(path, "weights file")
    with damaged(path, advice):
        tensors = load_file(str(path))
    if finite:
        refuse_non_finite(tensors, path, advice)
    return tensors


def refuse_non_finite(tensors: dict, path: Path, advice: str = "") -> None:
    """Refuse, in one line naming `path` and its first bad tensors, weights holding NaN or inf: loaded as they are,
    they score ROUGE 0 and a loss of nan without a word of why. Training stops before a non-finite step reaches the
    weights, so such a file was damaged, or written by a training run that diverged."""
    import torch

    def finite(tensor) -> bool:
        # A sum is one fast pass (20 times isfinite's on a CPU) and NaN or inf anywhere makes it non-finite; only a
        # sum that overflowed on finite values is checked element by element.
        return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())

    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not finite(tensor)]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        then = f"; {advice}" if advice else ""
        raise UserError(f"{path}: non-finite values (NaN or inf) in {shown} ({len(bad)} of {len(tensors)} tensors); "
                        f"the file is damaged or its training diverged{then}")


@contextlib.contextmanager
def damaged(path: Path, advice: str = ""):
    """Within the block, the ways a library fails on a damaged, incomplete or foreign file (safetensors' errors,
    a missing key or tensor, malformed JSON, an I/O error) become one UserError naming `path`, with `advice`."""
    then = f"; {advice}" if advice else ""
    try:
        yield
    except UserError:
        raise
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
                        f"{then}") from None
    except SafetensorError as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}{then}") from None
    except KeyError as error:
        missing = repr(error.args[0]) if error.args else "entry it needs"
        raise UserError(f"{path} has no {missing}: incomplete, or written for something else{then}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}{then}") from None
    except ValueError as error:  # what torch and others raise for content of the wrong shape or kind
        raise UserError(f"{path} cannot be used: {first_line(error)}{then}") from None


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name where it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


# ---------------------------------------------------------------- writing

def os_error(error: BaseException) -> OSError | None:
    """The operating system's error behind a failed write: an OSError, or the one a SafetensorError reports."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, SafetensorError):  # "... I/O error: No space left on device (os error 28) at path ..."
        found = re.search(r"os error (\d+)", str(error))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
    return None


def write_problem(error: BaseException, flag: str | None = None) -> str:
    """Why a write failed and what to do: free space for a full disk, another folder for an unwritable one."""
    os_err = os_error(error)
    if os_err is None:
        return str(error)
    reason = os_err.strerror or str(os_err)
    if os_err.errno in NO_SPACE:
        return f"{reason}: free some space on that device"
    if os_err.errno in NOT_WRITABLE:
        hint = " (immutable or append-only? see lsattr)" if os_err.errno == errno.EPERM else ""
        other = f"choose another {flag} or make it writable" if flag else "make it writable"
        return f"{reason}{hint}: the folder is not writable; {other}"
    return reason


def check_writable(folder: Path, flag: str, given: Path | None = None) -> None:
    """Refuse, before any compute, an output folder that cannot be created or written, naming it and the reason.

    `given` is what the user passed to `flag` when that is not the folder itself (a file to write in it). Nothing is
    created: a probe file is written (and flushed, which is where a full disk shows) in the folder, or in its nearest
    existing parent if the folder does not exist yet, then removed.
    """
    if not str(given if given is not None else folder).strip():
        raise UserError(f"{flag} is empty; give a folder")
    folder = Path(folder)
    named = f"{flag} {given if given is not None else folder}"
    existing = folder
    while kind_of(existing) is None and existing != existing.parent:
        existing = existing.parent
    kind = kind_of(existing)
    if kind != "a folder":
        raise UserError(f"{named}: {existing} is {kind}, not a folder")
    probe = existing / f".peftsum-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise UserError(f"{named}: cannot write in {existing}: {write_problem(error, flag)}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


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
        raise UserError(f"cannot create the output folder {path}: {write_problem(error)}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    # Named by pid rather than mkstemp: mkstemp's 0600 mode would survive the rename and hide the file from others.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        # Without this flush a crash soon after the rename can leave the new name pointing at an empty file.
        fsync(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:  # a full disk or a read-only folder: the user's to fix, not a bug
        with contextlib.suppress(OSError):
            tmp.unlink()
        if os_error(error) is None:
            raise
        raise UserError(f"cannot write {path}: {write_problem(error)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync(path.parent)


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Remove what writers that were killed (SIGKILL, a preempted job) left staged in `folder`: the names that match
    `pattern`, a regular expression whose first group is the writer's process id, where that process is gone. A
    staged export can be the size of a model; a live writer's (a concurrent export) is left alone."""
    for path in Path(folder).glob(".*"):
        found = re.fullmatch(pattern, path.name)
        if found is None or _alive(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


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
