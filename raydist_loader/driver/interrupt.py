"""Layer 4 (driver): Ctrl-C at the driver (no Ray import): a load stops within a second whatever the main thread is
doing, and its clean-up is not cut short.

Python turns SIGINT into a KeyboardInterrupt at the main thread's next bytecode, and some places lose it: starting
a local Ray cluster forks a dozen processes, and a KeyboardInterrupt raised inside the fork hooks (logging's
``_releaseLock``) is printed as "Exception ignored" and dropped, so the load ran to its end and exited 0.
:class:`InterruptGuard` keeps the request until someone acts on it:

- a SIGINT is recorded, then raised as KeyboardInterrupt, except while the main thread is inside
  ``subprocess.Popen``'s fork (it would be dropped there, or leave a half-started process): that one is deferred;
- until the guard sees the KeyboardInterrupt arrive (:meth:`InterruptGuard.shielded` or the end of the ``with``
  block), a watchdog thread sends SIGINT to the main thread again every ``redeliver_s``, so a dropped or deferred
  one lands at the next safe point;
- inside :meth:`InterruptGuard.shielded` (the clean-up: actors killed, placement group removed) a SIGINT is only
  recorded, so a second Ctrl-C cannot leave actors behind.

The guard acts only in the main thread and only where SIGINT has Python's default handler: a process that ignores
SIGINT (a background job) or handles it itself (an engine) keeps its own behaviour.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class InterruptGuard:
    """``with InterruptGuard() as guard:`` around work that Ctrl-C must stop; clean up inside ``guard.shielded()``."""

    def __init__(self, redeliver_s: float = 0.5):
        self.redeliver_s = redeliver_s
        self.requested = False  # a SIGINT arrived while the guard was active
        self._active = False
        self._shield = False
        self._previous: Any = None
        self._stop = threading.Event()
        self._sending = threading.Lock()  # no re-delivery once the guard has let go of SIGINT
        self._watchdog: threading.Thread | None = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.default_int_handler:
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
                self._active = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        pending = self._pending
        self._shield = True  # first: from here on the handler only records, so nothing below can be cut short
        with self._sending:
            self._stop.set()  # the interrupt (if any) has reached this frame
        if self._active:
            signal.signal(signal.SIGINT, self._previous)
            self._active = False
        self._shield = False
        if pending and exc_type is None:
            raise KeyboardInterrupt  # requested, and every delivery was dropped on the way

    def check(self) -> None:
        """Raise the KeyboardInterrupt of a SIGINT that was requested but has not arrived yet."""
        if self._pending:
            self._stop.set()
            raise KeyboardInterrupt

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Clean-up that must finish: the pending interrupt counts as received, and a new SIGINT is only recorded."""
        self._shield = True  # first, so that a re-delivery landing now cannot skip the clean-up
        with self._sending:
            self._stop.set()
        try:
            yield
        finally:
            self._shield = False

    # ---------------------------------------------------------------- internals
    @property
    def _pending(self) -> bool:
        return self.requested and not self._stop.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._shield:
            return
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._redeliver, name="raydist-sigint", daemon=True)
            self._watchdog.start()
        if _forking(frame):
            return  # raised here it would be dropped; the watchdog delivers it again in a moment
        raise KeyboardInterrupt

    def _redeliver(self) -> None:
        main = threading.main_thread().ident
        while not self._stop.wait(self.redeliver_s):
            with self._sending:
                if main is None or self._shield or self._stop.is_set():
                    return
                signal.pthread_kill(main, signal.SIGINT)


def _forking(frame: FrameType | None) -> bool:
    """Whether the main thread is inside ``subprocess.Popen._execute_child`` (a fork and its at-fork hooks)."""
    while frame is not None:
        if frame.f_code.co_name == "_execute_child" and frame.f_globals.get("__name__") == "subprocess":
            return True
        frame = frame.f_back
    return False
