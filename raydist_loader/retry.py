"""Layer 0 (base): Retries for transient backend failures: exponential backoff with full jitter, bounded by attempts and
time.

What is retried: a :class:`~raydist_loader.errors.BackendError` whose ``transient`` is True (connection reset or
refused, timeouts, Redis LOADING/BUSY, S3 5xx/SlowDown: the connectors decide), and raw ``ConnectionError`` /
``TimeoutError`` that a plug-in connector may let through. Everything else (auth, a missing key, a bad manifest,
a digest mismatch, a bug) is raised at once, unchanged. A transient error marked ``until_deadline`` (a Redis Cluster
promoting a replica) is retried until the deadline even past the attempt limit.

When the attempts or the deadline run out, :func:`call` raises one ``BackendError`` that says how many attempts
were made over how many seconds and what the last failure was. Reads are idempotent (they fill the same buffers
again), so a whole batch can simply be re-run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import BackendError, ConfigError, RaydistError

__all__ = ["RetryPolicy", "NO_RETRY", "call", "is_transient", "coerce_policy"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry a transient failure.

    ``attempts`` counts the first try (1 = no retry). The n-th retry waits a uniformly random time in
    ``[0, min(max_delay_s, base_delay_s * 2**(n-1))]`` ("full jitter": ranks that failed together do not retry in
    lock-step). No retry starts once ``deadline_s`` seconds have passed since the first try, and no wait runs past it.
    """

    attempts: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    deadline_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"retries.attempts must be an integer >= 1, got {self.attempts!r}")
        for name in ("base_delay_s", "max_delay_s", "deadline_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"retries.{name} must be a number >= 0, got {value!r}")
        if self.deadline_s == 0:
            raise ConfigError("retries.deadline_s must be > 0")

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before retry number ``retry`` (1-based), jittered."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** min(retry - 1, 60)))
        return rand() * cap


#: One attempt, no waiting: the behaviour before retries existed.
NO_RETRY = RetryPolicy(attempts=1, base_delay_s=0.0, max_delay_s=0.0, deadline_s=1e9)


def coerce_policy(value: RetryPolicy | Mapping[str, Any] | None) -> RetryPolicy:
    """``None`` -> the default policy; a mapping (from YAML or a caller) -> a validated policy."""
    if value is None:
        return RetryPolicy()
    if isinstance(value, RetryPolicy):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(RetryPolicy)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown retry option(s) {unknown}; known: {', '.join(sorted(known))}")
        return RetryPolicy(**dict(value))
    raise ConfigError(f"retry must be a RetryPolicy, a mapping or None, got {type(value).__name__}")


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help with ``exc``."""
    if isinstance(exc, BackendError):
        return bool(exc.transient)
    if isinstance(exc, RaydistError):  # NotFoundError, ManifestError, VerificationError...: permanent
        return False
    return isinstance(exc, (ConnectionError, TimeoutError))  # socket.timeout is TimeoutError


def call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run ``fn()``; retry transient failures as ``policy`` allows; raise permanent ones at once.

    ``what`` names the operation in the final error ("reading 12 chunks from redis://host:6379/0"); the caller
    must have redacted it. ``sleep``, ``clock`` and ``rand`` are for tests (a fake clock).
    """
    start = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except BaseException as exc:  # noqa: BLE001 - classified below; non-transient ones re-raise unchanged
            if not is_transient(exc) or policy.attempts == 1:
                raise
            elapsed = clock() - start
            limited = attempt >= policy.attempts and not getattr(exc, "until_deadline", False)
            wait = 0.0 if limited else policy.delay(attempt, rand)
            if limited or elapsed + wait >= policy.deadline_s:
                raise _exhausted(exc, what, attempt, elapsed, policy, limited) from exc
            if wait > 0:
                sleep(wait)


def _exhausted(
    exc: BaseException, what: str, attempts: int, elapsed: float, policy: RetryPolicy, limited: bool
) -> BackendError:
    last = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
    bound = (
        f"the retry limit of {policy.attempts} attempts"
        if limited
        else f"the retry deadline of {policy.deadline_s:g}s"
    )
    plural = "attempt" if attempts == 1 else "attempts"
    error = BackendError(
        f"{what} failed after {attempts} {plural} over {elapsed:.1f}s ({bound}); last error: {last}",
        transient=False,  # already retried: outer layers must not retry again
    )
    error.attempts = attempts  # type: ignore[attr-defined]
    error.elapsed_s = elapsed  # type: ignore[attr-defined]
    return error
