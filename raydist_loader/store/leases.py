"""Layer 2 (store): Leases: a loading or serving reader's claim on the version it uses, so ``gc`` never deletes it.

A lease is a small JSON object ``<model>/leases/<version>/<id>.json`` (its holder, host, pid, when it started, when
it was last renewed and when it expires), rewritten every ``ttl_s / 3`` seconds by a daemon thread of the holding
process over a connector of its own. A lease that is not renewed (the process died, the host is gone) expires after
``ttl_s``; ``gc`` keeps every version with an unexpired lease, ``versions`` shows who holds each. Times are the
holder's clock: keep hosts' clocks within a fraction of ``ttl_s`` (NTP does).

Leases live outside every version prefix, so gc's deletion of versions never touches them, and deleting a model's
``leases/`` with the backend's own tools only drops the protection.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from ..connectors import Connector, open_connector
from ..errors import ConfigError, RaydistError
from ..redact import redact_text
from . import manifest as mf

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
_MAX_LEASE_BYTES = 4096


def lease_prefix(model: str, version: str | None = None) -> str:
    base = f"{mf.check_model_name(model)}/leases/"
    return base if version is None else f"{base}{version}/"


@dataclass(frozen=True)
class LeaseInfo:
    """One lease as stored."""

    version: str
    holder: str
    host: str
    pid: int
    started: float
    renewed: float
    expires: float
    key: str

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)

    def describe(self) -> str:
        return f"{self.holder} on {self.host} (pid {self.pid}, since {stamp(self.started)})"


def stamp(t: float) -> str:
    """A time as operators read it: ``2026-12-04 18:30:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def read_leases(conn: Connector, model: str, version: str | None = None) -> dict[str, list[LeaseInfo]]:
    """Every lease of ``model`` (of ``version`` only, when given) by version, expired ones included (a damaged
    lease object is skipped)."""
    out: dict[str, list[LeaseInfo]] = {}
    prefix = lease_prefix(model)
    for key in conn.list(lease_prefix(model, version)):
        version = key[len(prefix):].split("/", 1)[0]
        if not mf.VERSION_RE.match(version) or not key.endswith(".json"):
            continue
        try:
            if (conn.stat(key) or 0) > _MAX_LEASE_BYTES:
                continue
            doc = json.loads(conn.read(key))
            info = LeaseInfo(version, str(doc["holder"])[:200], str(doc["host"])[:200], int(doc["pid"]),
                             float(doc["started"]), float(doc["renewed"]), float(doc["expires"]), key)
        except (RaydistError, ValueError, KeyError, TypeError):
            continue  # gone meanwhile (released), or not a lease we wrote
        out.setdefault(version, []).append(info)
    return out


MIN_TTL_S = 3.0


def check_ttl(ttl_s: float, where: str = "lease ttl") -> float:
    if not ttl_s == ttl_s or ttl_s < MIN_TTL_S or ttl_s > 7 * 86400:
        raise ConfigError(f"{where}: got {ttl_s}; expected seconds in [{MIN_TTL_S:g}, 604800] (renewed every third)")
    return float(ttl_s)


@contextmanager
def brief_lease(conn: Connector, model: str, version: str, holder: str, ttl_s: float = DEFAULT_TTL_S):
    """A lease on ``version`` written through ``conn`` for the length of a short operation (a promote), not renewed:
    gc leaves the version alone meanwhile."""
    now = time.time()
    key = f"{lease_prefix(model, version)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    doc = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now,
           "expires": now + ttl_s}
    conn.write(key, json.dumps(doc).encode())
    try:
        yield
    finally:
        try:
            conn.delete(key)
        except Exception:  # noqa: BLE001 - it expires on its own
            log.debug("could not delete lease %s", key, exc_info=True)


def drop_expired(conn: Connector, model: str, older_than_s: float, now: float | None = None) -> int:
    """Delete leases that expired more than ``older_than_s`` ago (their holders died: gc tidies them up)."""
    now = time.time() if now is None else now
    gone = 0
    for leases in read_leases(conn, model).values():
        for x in leases:
            if x.expires < now - older_than_s:
                conn.delete(x.key)
                gone += 1
    return gone


class Lease:
    """A claim on one version of one model, renewed in the background until :meth:`release` (or the process ends).

    ``opener`` opens the lease's own connector (the renewing thread never shares the caller's). :meth:`move` takes
    the lease over to another version (an engine's update): the new version is leased before the old one is let
    go, so neither is unprotected in between."""

    def __init__(self, opener: Callable[[], Connector], model: str, version: str, holder: str, *,
                 ttl_s: float = DEFAULT_TTL_S):
        self._opener, self.model, self.version, self.holder = opener, model, version, holder
        self.ttl_s = float(ttl_s)
        self.host, self.pid, self.started = socket.gethostname(), os.getpid(), time.time()
        self._id = f"{self.host}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conn = opener()
        self._thread: threading.Thread | None = None

    @classmethod
    def take(cls, url: str, model: str, version: str, holder: str, *, connector_options: dict | None = None,
             ttl_s: float | None = None) -> Lease:
        """Write a lease on ``version`` now and keep it renewed (``ttl_s`` default: ``RAYDIST_LEASE_TTL_S`` or
        120 s)."""
        if ttl_s is None:
            text = os.environ.get("RAYDIST_LEASE_TTL_S")
            try:
                ttl_s = float(text) if text else DEFAULT_TTL_S
            except ValueError:
                raise ConfigError(f"RAYDIST_LEASE_TTL_S={text!r}: expected seconds") from None
        ttl = check_ttl(ttl_s, "RAYDIST_LEASE_TTL_S" if os.environ.get("RAYDIST_LEASE_TTL_S") else "lease ttl")
        lease = cls(lambda: open_connector(url, **(connector_options or {})), model, version, holder, ttl_s=ttl)
        lease.start()
        return lease

    @classmethod
    def try_take(cls, url: str, model: str, version: str, holder: str, *,
                 connector_options: dict | None = None) -> Lease | None:
        """:meth:`take`, or None with a warning when the store takes no lease (read-only credentials): a lease
        never fails a load, which then goes on with gc not knowing about it."""
        try:
            return cls.take(url, model, version, holder, connector_options=connector_options)
        except Exception as e:  # noqa: BLE001 - the load goes on unprotected; the warning says so
            log.warning("raydist: no lease on %s version %s (%s): gc does not know %s uses it", model, version,
                        redact_text(str(e)), holder)
            return None

    @property
    def key(self) -> str:
        return f"{lease_prefix(self.model, self.version)}{self._id}.json"

    def _write(self) -> None:
        now = time.time()
        doc = {"holder": self.holder, "host": self.host, "pid": self.pid, "started": self.started,
               "renewed": now, "expires": now + self.ttl_s}
        self._conn.write(self.key, json.dumps(doc).encode())

    def start(self) -> Lease:
        try:
            self._write()
        except BaseException:
            self._stop.set()
            self._conn.close()
            raise
        self._thread = threading.Thread(target=self._renew, name=f"raydist-lease-{self.version}", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._write()
                except Exception as e:  # noqa: BLE001 - a store hiccup: try again next period
                    log.warning("raydist: could not renew the lease on %s version %s: %s", self.model, self.version,
                                redact_text(str(e)))

    def move(self, version: str) -> None:
        """Lease ``version`` instead (written before the old lease is deleted)."""
        if version == self.version or self._stop.is_set():
            return
        with self._lock:
            old = self.key
            self.version, self.started = version, time.time()
            self._write()
            self._delete(old)

    def release(self) -> None:
        """Stop renewing and delete the lease (best effort: an unreachable store lets it expire instead)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            self._delete(self.key)
            self._conn.close()
        atexit.unregister(self.release)

    def _delete(self, key: str) -> None:
        try:
            self._conn.delete(key)
        except Exception:  # noqa: BLE001 - it expires on its own
            log.debug("could not delete lease %s", key, exc_info=True)

    def __repr__(self) -> str:
        return f"Lease({self.model!r}, {self.version}, holder={self.holder!r})"
