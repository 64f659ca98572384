"""Stop signals: SIGTERM (how SLURM and Kubernetes preempt) and SIGHUP (a closed terminal) stop a run as Ctrl-C does.

Two pieces:

- `interrupts()`, around a whole command: SIGTERM and SIGHUP raise `Interrupted`, a KeyboardInterrupt, as SIGINT
  raises KeyboardInterrupt, so every `finally` runs (temporary files removed, the run folder's lock released) and the
  command exits with 128 + the signal's number (`exit_code`): 130, 143, 129.
- `StopSignal`, around the training loop: the first SIGINT, SIGTERM or SIGHUP only records which signal came; the
  loop polls `is_set()` at each step boundary, where the state is whole (never half an optimizer update), saves a
  checkpoint and stops. A second signal interrupts at once; checkpoints are written atomically, so the last complete
  one stays intact. A StopSignal is also an ordinary object the loop can be handed and a caller can `set()`.

A signal the process was told to ignore stays ignored: `nohup` sets SIGHUP to SIG_IGN, and background jobs of a
non-interactive shell ignore SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal that interrupts at once (SIGTERM or SIGHUP for a whole command, or a second signal in training)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def exit_code(exc: BaseException) -> int:
    """The shell's code for a process ended by a signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(exc, "signum", None) or signal.SIGINT)


def by(exc: BaseException) -> str:
    """' by SIGTERM' (or SIGHUP...) for an interruption by another signal than Ctrl-C's, for messages; else ''."""
    signum = getattr(exc, "signum", None)
    return f" by {signal.Signals(signum).name}" if signum not in (None, signal.SIGINT) else ""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only the main thread may set handlers


def _install(handler, signums) -> dict:
    """Set `handler` for each signal not ignored by the process; returns the handlers it replaced."""
    previous = {}
    for signum in signums:
        old = signal.getsignal(signum)
        if old == signal.SIG_IGN:
            continue
        previous[signum] = old
        signal.signal(signum, handler)
    return previous


def _restore(previous: dict) -> None:
    for signum, old in previous.items():
        # None: a handler installed outside Python, which cannot be put back; SIGINT's own is the nearest.
        signal.signal(signum, signal.default_int_handler if old is None and signum == signal.SIGINT
                      else signal.SIG_DFL if old is None else old)


@contextlib.contextmanager
def interrupts():
    """Within the block, SIGTERM and SIGHUP raise `Interrupted` as Ctrl-C raises KeyboardInterrupt."""
    if not _main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = _install(handler, [s for s in SIGNALS if s != signal.SIGINT])
    try:
        yield
    finally:
        _restore(previous)


class StopSignal:
    """A request to stop at the next step boundary, and (as a context manager) the signals that make it.

    `signum` is the signal that asked (None until one did, or until `set` is called). A KeyboardInterrupt leaving
    the block (the loop's own TrainingInterrupted included) carries it as `signum`, which gives the exit code.
    """

    def __init__(self):
        self._requested = threading.Event()
        self.signum: int | None = None
        self._previous: dict = {}

    def set(self, signum: int = signal.SIGINT) -> None:
        if self.signum is None:
            self.signum = signum
        self._requested.set()

    def is_set(self) -> bool:
        return self._requested.is_set()

    def _handler(self, signum, frame):
        if self.is_set():  # the second signal: the user (or the scheduler) will not wait for the step to end
            raise Interrupted(signum)
        self.set(signum)

    def __enter__(self) -> StopSignal:
        if _main_thread():
            self._previous = _install(self._handler, SIGNALS)
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        _restore(self._previous)
        self._previous = {}
        if isinstance(exc, KeyboardInterrupt) and getattr(exc, "signum", None) is None and self.signum is not None:
            exc.signum = self.signum
        return False
