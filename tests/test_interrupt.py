"""InterruptGuard without Ray: a Ctrl-C is never lost on its way to the caller, and clean-up is never cut short.

The loss these tests reproduce is the one that made ``raydist-loader load`` ignore Ctrl-C: starting a local Ray
cluster spawns processes with a ``preexec_fn``, so Python runs its at-fork hooks (logging's ``_releaseLock``) and
drops, as "Exception ignored", a KeyboardInterrupt raised inside them. The end-to-end checks (the CLI and a Python
session against a real cluster) are in test_hold_interrupt.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from raydist_loader.driver.interrupt import InterruptGuard

_ARMED = threading.Event()
_HOOKED = False


def _sigint_inside_the_fork_hooks() -> None:
    """From now on, the next process spawned while ``_ARMED`` is set gets a SIGINT delivered inside Python's
    at-fork hooks (a hook cannot be unregistered, so it is registered once and armed per test)."""
    global _HOOKED
    if not _HOOKED:
        def hook() -> None:
            if _ARMED.is_set():
                _ARMED.clear()
                os.kill(os.getpid(), signal.SIGINT)

        os.register_at_fork(after_in_parent=hook)
        _HOOKED = True
    _ARMED.set()


def test_a_ctrl_c_while_a_process_starts_reaches_the_caller(monkeypatch: pytest.MonkeyPatch):
    dropped: list = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    spawned = 0
    with pytest.raises(KeyboardInterrupt):
        with InterruptGuard(redeliver_s=0.05):
            _sigint_inside_the_fork_hooks()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # what ray.init does: start processes, then wait for them
                subprocess.run(["true"], preexec_fn=lambda: None, check=True)  # noqa: PLW1509 - as Ray does
                spawned += 1
                time.sleep(0.1)
    assert spawned >= 1, "the interrupt came while the first process started, and was held back until it had"
    assert not dropped, f"a KeyboardInterrupt was dropped: {dropped}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the guard restored the handler"


def test_an_interrupt_swallowed_by_a_library_is_delivered_again():
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with InterruptGuard(redeliver_s=0.05):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass  # e.g. a library's `except BaseException: pass`
            time.sleep(5)  # the guard delivers it again long before this ends
    assert time.monotonic() - t0 < 4


def test_clean_up_inside_shielded_is_not_cut_short():
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with InterruptGuard(redeliver_s=0.05) as guard:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                with guard.shielded():
                    os.kill(os.getpid(), signal.SIGINT)  # an impatient second Ctrl-C
                    time.sleep(0.3)
                    finished = True
                raise
    assert finished and guard.requested


def test_a_process_that_ignores_sigint_keeps_ignoring_it():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job
    try:
        with InterruptGuard(redeliver_s=0.05) as guard:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        assert not guard.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
