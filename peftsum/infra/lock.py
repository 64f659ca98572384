"""An exclusive lock on a run folder: one process at a time writes into it.

Without it, two commands given the same `--out` both run to the end and one result silently replaces the other.
`holding(folder)` first checks that the folder can be written (`files.check_writable`, before any compute), creates
it, and holds `folder/.peftsum.infra.lock` until the block ends: an advisory `fcntl.flock`, which the kernel drops when the
process dies however it dies (SIGKILL included), on a file naming the holder (pid, host, start time, command). A
second process finds the lock held and stops with exit code 2, naming the holder. A lock file left behind by a
process that died is no longer held: it is taken over, with a note naming the process that left it. Where the file
system has no flock (some network file systems), the file alone decides: a holder on this host that is no longer
running is taken over, any other is refused.

Several processes of one data-parallel run (torchrun, accelerate launch) share the folder legitimately: rank 0 alone
holds the lock, and its refusal reaches every rank.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import sys
from pathlib import Path

from ..errors import UserError
from .files import check_writable, kind_of, make_folder, write_problem

LOCK = ".peftsum.infra.lock"
# What flock raises where the file system does not support it (then the lock file's content decides).
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


class Lock:
    """A held lock: the open lock file (its flock) and the folders created for it, removed on release if empty."""

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        try:
            if _same_file(self.fd, self.path):  # never remove a lock file that is no longer ours
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # drops the flock
        for folder in self.created:  # deepest first: a run that failed before writing leaves no empty folders
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def holding(folder: Path, flag: str = "--out"):
    """Hold the lock on `folder` (created if missing) for the block; rank 0 only when several processes run."""
    from . import distributed

    held: list[Lock] = []
    distributed.on_main(lambda: held.append(acquire(Path(folder), flag)))
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def acquire(folder: Path, flag: str = "--out") -> Lock:
    """Take the lock on `folder`, or raise a UserError naming the process that holds it."""
    check_writable(folder, flag)
    created = [p for p in (folder, *folder.parents) if kind_of(p) is None]
    make_folder(folder)
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise UserError(f"cannot create the lock file {path}: {write_problem(error, flag)}") from None
        locked = _flock(fd, path)
        if locked is False:
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(folder, holder, flag)
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and our flock: open the new one
    previous = _holder(fd)
    if previous.get("pid") not in (None, os.getpid()):
        if locked is None and not _gone(previous):
            os.close(fd)
            raise _in_use(folder, previous, flag, f" (this file system cannot lock files: if that process is "
                                                  f"gone, delete {path})")
        print(f"peftsum: note: taking over the lock on {folder} left by {_describe(previous)}, which is no longer "
              f"running", file=sys.stderr)
    _write_holder(fd)
    return Lock(path, fd, created)


def _flock(fd: int, path: Path) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in NO_FLOCK:
            return None
        os.close(fd)
        raise UserError(f"cannot lock {path}: {error.strerror}") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _holder(fd: int) -> dict:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    since = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = " ".join(["peftsum", *sys.argv[1:]])
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": command})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (data + "\n").encode("utf-8"), 0)
    os.fsync(fd)


def _gone(holder: dict) -> bool:
    """Whether the holder is known to be dead: a process of this host that is no longer running."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # running, under another user
        return False
    return False


def _describe(holder: dict) -> str:
    command = holder.get("command", "")
    command = f": {command[:77]}..." if len(command) > 80 else f": {command}" if command else ""
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')}"
            f"{command})")


def _in_use(folder: Path, holder: dict, flag: str, more: str = "") -> UserError:
    return UserError(f"{folder} is in use by {_describe(holder)}; wait for it to finish or choose another "
                     f"{flag}{more}")
