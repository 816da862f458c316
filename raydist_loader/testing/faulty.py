"""Aside (testing, imported by no product module): ``faulty+<scheme>://``: a wrapper connector that fails, delays or
corrupts chosen reads (fault-injection tests).

The fault plan lives in the URL's query, so it is deterministic and needs no shared state: every process that
opens the URL (the driver, each Ray actor, a restarted actor) builds the same plan, and counters are per connector
instance. Parameters (all optional; the others go to the wrapped URL untouched)::

    fail=N            the first N chunk-read calls (after ``fail_after``) raise ``fail_error``        (default 0)
    fail_after=K      let K chunk-read calls succeed before failing                                  (default 0)
    fail_error=KIND   reset | timeout | refused | loading | slowdown (transient), auth | missing (permanent)
    fail_key=SUB      only read calls that touch a key containing SUB count (and fail)
    delay_ms=D        sleep D ms before every chunk-read call (so a kill lands in the middle of a load)
    corrupt=SUB       after the inner read, flip one byte of the buffer of each read of a key containing SUB,
                      the first ``corrupt_times`` times per key (corruption in transit: a re-pull heals it)
    corrupt_times=T   (default 1)
    seed=S            chooses the flipped byte (default 0)
    request_bytes=B   the largest single request (more, smaller read calls: finer-grained faults)
    concurrency=C     requests in flight per loader when the caller does not choose
    manifest=1        let faults hit ``<model>/manifest.json`` reads too (off by default: the driver reads it)
    full_after=W      the store fills up after W writes: every later write raises ``OSError`` ENOSPC
    hold=DIR          hold every process but the first at its first read of a ``manifest.json`` until DIR/release
                      exists (:mod:`.hold`: deterministic races between an engine's ranks)
    hold_key=SUB      with ``hold``: hold at the first read of a key containing SUB instead

Example: ``faulty+redis://127.0.0.1:6379/0?fail=2&fail_error=loading&delay_ms=20``.

Registration: in-process with :meth:`FaultyConnector.register`; in Ray worker processes through
``ray.init(runtime_env={"worker_process_setup_hook": "raydist_loader.testing.faulty.register_all"})``; or for
every process through entry points (``pyproject.toml``)::

    [project.entry-points."raydist_loader.connectors"]
    "faulty+file" = "raydist_loader.testing.faulty:FaultyConnector"
    "faulty+redis" = "raydist_loader.testing.faulty:FaultyConnector"
    "faulty+rediss" = "raydist_loader.testing.faulty:FaultyConnector"
    "faulty+s3" = "raydist_loader.testing.faulty:FaultyConnector"
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..connectors import open_connector, register_connector
from ..connectors.base import Buffer, Connector, ReadRequest
from ..errors import BackendError, ConfigError, NotFoundError
from .hold import ManifestHold

PREFIX = "faulty+"
SCHEMES = ("file", "redis", "rediss", "s3")
ERROR_KINDS = ("reset", "timeout", "refused", "loading", "slowdown", "auth", "missing")
_INT_PARAMS = (
    "fail", "fail_after", "corrupt_times", "seed", "request_bytes", "concurrency", "manifest", "full_after"
)
_STR_PARAMS = ("fail_error", "fail_key", "corrupt", "hold", "hold_key")
_FLOAT_PARAMS = ("delay_ms",)
_PARAMS = frozenset(_INT_PARAMS + _STR_PARAMS + _FLOAT_PARAMS)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """``faulty+redis://h:1/0?fail=2&x=y`` -> (``redis://h:1/0?x=y``, ``{"fail": "2"}``)."""
    if not url.lower().startswith(PREFIX):
        raise ConfigError(f"a faulty connector URL starts with {PREFIX!r}<scheme>://")
    inner = url[len(PREFIX) :]
    parts = urlsplit(inner)
    plan, rest = {}, []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _PARAMS:
            plan[k] = v
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), plan


class FaultPlan:
    """The parsed fault parameters (see the module docstring)."""

    def __init__(self, params: dict[str, str]):
        try:
            ints = {k: int(params.get(k, 0)) for k in _INT_PARAMS}
            delay_ms = float(params.get("delay_ms", 0))
        except ValueError as e:
            raise ConfigError(f"bad faulty+ URL parameter: {e}") from None
        self.fail, self.fail_after = ints["fail"], ints["fail_after"]
        self.corrupt_times, self.seed = ints["corrupt_times"] or 1, ints["seed"]
        self.request_bytes, self.concurrency = ints["request_bytes"], ints["concurrency"]
        self.manifest = bool(ints["manifest"])
        self.full_after = ints["full_after"] if "full_after" in params else None
        self.delay_s = delay_ms / 1000.0
        self.fail_error = params.get("fail_error", "reset")
        if self.fail_error not in ERROR_KINDS:
            raise ConfigError(f"fail_error={self.fail_error!r} is not one of {', '.join(ERROR_KINDS)}")
        self.fail_key = params.get("fail_key") or ""
        self.corrupt = params.get("corrupt") or None
        self.hold = ManifestHold(params["hold"], params.get("hold_key")) if params.get("hold") else None


class FaultyConnector(Connector):
    """Wraps the connector of ``<scheme>://...`` and injects the faults its URL asks for into chunk reads."""

    schemes = tuple(PREFIX + s for s in SCHEMES)

    def __init__(self, url: str, **options: object):
        super().__init__(url)
        inner_url, params = split_url(url)
        self.plan = FaultPlan(params)
        self.inner = open_connector(inner_url, **options)
        # behave like the wrapped backend (chunk layout, request sizes), unless the plan overrides
        self.packs_files = self.inner.packs_files
        self.max_object_bytes = self.inner.max_object_bytes
        self.coalesce_gap = self.inner.coalesce_gap
        self.default_concurrency = self.plan.concurrency or self.inner.default_concurrency
        self.max_request_bytes = self.plan.request_bytes or self.inner.max_request_bytes
        self._lock = threading.Lock()
        self._calls = 0  # chunk-read calls that matched fail_key
        self.failures_injected = 0
        self.corruptions_injected = 0
        self._corrupted: dict[str, int] = {}
        self._writes = 0

    @classmethod
    def register(cls, schemes: Iterable[str] = SCHEMES) -> None:
        """Serve ``faulty+<scheme>://`` in this process (tests call it; Ray workers via :func:`register_all`)."""
        for scheme in schemes:
            register_connector(PREFIX + scheme, f"{__name__}:{cls.__name__}")

    # ----------------------------------------------------------------- reads (where faults happen)
    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        self.readinto_many([ReadRequest(key, offset, buf)])

    def readinto_many(self, requests: Sequence[ReadRequest]) -> None:
        if not requests:
            return
        if self.plan.hold is not None:
            self.plan.hold.before_read(requests[0].key)
        targeted = self._before(requests)
        self.inner.readinto_many(requests)
        if targeted:
            self._maybe_corrupt(requests)

    def read(self, key: str) -> bytes:
        """The inner backend's whole-object read (atomic there), faulted like one range read of ``key``."""
        if self.plan.hold is not None:
            self.plan.hold.before_read(key)
        targeted = self._before([ReadRequest(key, 0, memoryview(b""))])
        data = bytearray(self.inner.read(key))
        if targeted:
            self._maybe_corrupt([ReadRequest(key, 0, memoryview(data))])
        return bytes(data)

    def _before(self, requests: Sequence[ReadRequest]) -> bool:
        """Delay and maybe fail a read; True when the plan targets it (manifest reads only with ``manifest=1``)."""
        targeted = self.plan.manifest or not all(r.key.endswith("/manifest.json") for r in requests)
        if targeted:
            if self.plan.delay_s:
                time.sleep(self.plan.delay_s)
            self._maybe_fail(requests)
        return targeted

    def _maybe_fail(self, requests: Sequence[ReadRequest]) -> None:
        plan = self.plan
        if not plan.fail or (plan.fail_key and not any(plan.fail_key in r.key for r in requests)):
            return
        with self._lock:
            self._calls += 1
            n = self._calls
            fire = plan.fail_after < n <= plan.fail_after + plan.fail
            if fire:
                self.failures_injected += 1
        if fire:
            raise self._error(requests[0].key)

    def _error(self, key: str) -> Exception:
        where, kind = self.describe(), self.plan.fail_error
        if kind == "reset":
            return ConnectionResetError(104, f"Connection reset by peer (injected while reading {key!r})")
        if kind == "timeout":
            return TimeoutError(f"timed out (injected while reading {key!r})")
        if kind == "refused":
            msg = f"cannot reach {where} while reading {key!r}: connection refused (injected)"
            return BackendError(msg, transient=True)
        if kind == "loading":
            return BackendError(
                f"Redis at {where} is busy while reading {key!r} (LOADING Redis is loading the dataset in "
                "memory; injected); retry shortly",
                transient=True,
            )
        if kind == "slowdown":
            return BackendError(f"S3 at {where} answered 503 SlowDown while reading {key!r} (injected)", transient=True)
        if kind == "auth":
            return BackendError(f"authentication failed at {where} while reading {key!r} (injected)", transient=False)
        return NotFoundError(f"{key!r} does not exist in {where} (injected)")

    def _maybe_corrupt(self, requests: Sequence[ReadRequest]) -> None:
        if not self.plan.corrupt:
            return
        for req in requests:
            if self.plan.corrupt not in req.key or not len(req.buf):
                continue
            with self._lock:
                seen = self._corrupted.get(req.key, 0)
                if seen >= self.plan.corrupt_times:
                    continue
                self._corrupted[req.key] = seen + 1
                self.corruptions_injected += 1
            at = random.Random(f"{self.plan.seed}:{req.key}:{seen}").randrange(len(req.buf))
            req.buf[at] = req.buf[at] ^ 0xFF

    # ----------------------------------------------------------------- everything else is the inner backend's
    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        with self._lock:
            self._writes += 1
            full = self.plan.full_after is not None and self._writes > self.plan.full_after
        if full:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected while writing {key!r})")
        self.inner.write(key, data)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def stat_many(self, keys: Sequence[str]) -> list[int | None]:
        return self.inner.stat_many(keys)

    def modified(self, keys: Sequence[str]) -> list[float | None]:
        return self.inner.modified(keys)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):  # backend extras (e.g. Redis' check_eviction_policy)
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def register_all() -> None:
    """Register every ``faulty+<scheme>`` (a Ray ``worker_process_setup_hook``)."""
    FaultyConnector.register()
