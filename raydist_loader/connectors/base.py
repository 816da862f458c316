"""Layer 1 (connectors): The connector contract: five primitives per backend, everything else derived here.

A connector addresses objects by '/'-separated keys relative to the store root given in its URL. Backends implement
``readinto`` (a byte range into a caller-supplied buffer, no extra copies), ``write`` (atomic: an object is seen
whole or not at all), ``list`` (a key prefix, paginated by the backend as needed), ``stat`` and ``delete``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import BackendError, ConfigError, NotFoundError
from ..redact import redact_url

Buffer = bytes | bytearray | memoryview
_READ_ATTEMPTS = 5


@dataclass(frozen=True)
class ReadRequest:
    """Read ``len(buf)`` bytes of object ``key`` starting at ``offset`` into ``buf`` (a writable memoryview)."""

    key: str
    offset: int
    buf: memoryview


class Connector(abc.ABC):
    """Base class of every backend. Subclasses set the class attributes and implement the five primitives."""

    #: URL schemes this class serves. Built-ins: the registry's lazy table (connectors/__init__.py) must list exactly
    #: these (a test checks); plug-ins: one entry point per scheme.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: True when publish should pack chunks into safetensors files (file, S3); False for one object per chunk.
    packs_files: ClassVar[bool] = True
    #: Largest value one object may hold; publish splits larger chunks into parts (Redis: 64 MiB).
    max_object_bytes: ClassVar[int | None] = None
    #: Gap (bytes) up to which two ranges of one object are read as one request.
    coalesce_gap: ClassVar[int] = 1 << 20
    #: Requests in flight per actor when the caller does not choose.
    default_concurrency: ClassVar[int] = 8
    #: Largest single request; longer reads are cut so several can be in flight.
    max_request_bytes: ClassVar[int] = 64 << 20

    def __init__(self, url: str):
        self.url = url

    # ----------------------------------------------------------------- primitives
    @abc.abstractmethod
    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with bytes ``[offset, offset + len(buf))`` of ``key``; a short object is an error."""

    @abc.abstractmethod
    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        """Store ``data`` (bytes, or an iterable of byte blocks streamed in order) as ``key``, atomically."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with ``prefix``, in sorted order."""

    @abc.abstractmethod
    def stat(self, key: str) -> int | None:
        """Size of ``key`` in bytes, or None when it does not exist."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    # ----------------------------------------------------------------- derived
    def readinto_many(self, requests: Sequence[ReadRequest]) -> None:
        """Serve a batch of reads: back-to-back ranges of one object become one request (``readv``).
        Backends with pipelining override this."""
        for key, offset, bufs in coalesce(requests):
            if len(bufs) == 1:
                self.readinto(key, offset, bufs[0])
            else:
                self.readv(key, offset, bufs)

    def readv(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in turn from one contiguous range of ``key``; backends override it with one request."""
        for buf in bufs:
            self.readinto(key, offset, buf)
            offset += len(buf)

    def write_many(self, items: Sequence[tuple[str, Buffer]]) -> None:
        """Store several objects, each atomically (publish's one-object-per-chunk path); backends with
        pipelining override it."""
        for key, data in items:
            self.write(key, data)

    def read(self, key: str) -> bytes:
        """The whole object as bytes (small objects: manifests, config files), as one version of it.

        A publish may replace the object while it is read (the manifest swap). Built-in backends override this
        with one atomic whole-object GET; this default, for plug-ins whose reads are ranges, reads the object until
        two reads in a row agree (a replacement landing between two ranges, even one of the same size, never
        comes back: a torn read must never parse as a manifest).
        """
        last = None
        for _ in range(_READ_ATTEMPTS):
            got = self._read_once(key)
            if got is not None and got == last:
                return got
            last = got
        raise BackendError(
            f"{key!r} in {self.describe()} kept changing while it was read ({_READ_ATTEMPTS} attempts): is "
            "something re-publishing it in a loop? Retry when the publish is done",
            transient=True,
        )

    def _read_once(self, key: str) -> bytes | None:
        """The object's bytes by ranges, or None when its size changed meanwhile (read again)."""
        size = self.stat(key)
        if size is None:
            raise NotFoundError(f"{key!r} does not exist in {self.describe()}")
        buf = bytearray(size)
        try:
            if size:
                self.readinto(key, 0, memoryview(buf))
        except (NotFoundError, BackendError):
            if self.stat(key) == size:
                raise
            return None
        return bytes(buf) if self.stat(key) == size else None

    def compare_and_swap(self, key: str, expected: bytes | None, data: Buffer) -> bool:
        """Store ``data`` as ``key`` only if ``key`` still holds exactly ``expected`` (None: only if it does not
        exist); False, with nothing written, when another writer changed it first. The manifest swap goes through
        this, so of concurrent publishes only one becomes current and the others know it.

        Built-in backends make the comparison and the write one atomic step (Redis: a server-side script; S3: a
        conditional PUT, ``If-Match`` / ``If-None-Match``; files: an exclusive ``flock`` of the directory around
        read, compare and rename). This default, for plug-ins, is best effort: it compares, writes, and reads back
        (a writer landing between its read and its write goes unseen unless it lands after the write too).
        """
        if self._current(key) != expected:
            return False
        self.write(key, data)
        return self._current(key) == bytes(data)

    def _current(self, key: str) -> bytes | None:
        """The whole object, or None when it does not exist."""
        try:
            return self.read(key)
        except NotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat_many(self, keys: Sequence[str]) -> list[int | None]:
        """``stat`` of many keys in one cheap pass (publish confirms what it wrote); backends that can pipeline
        override it."""
        return [self.stat(key) for key in keys]

    def modified(self, keys: Sequence[str]) -> list[float | None]:
        """When each key was last written (seconds since the epoch, the store's clock), or None where the key is
        missing or the backend cannot tell. ``gc`` never deletes what it cannot date; this default dates nothing."""
        return [None] * len(keys)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many."""
        if not prefix:
            raise ValueError("refusing to delete an empty prefix (the whole store)")
        keys = list(self.list(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    def describe(self) -> str:
        """The store URL with secrets redacted: safe to print."""
        return redact_url(self.url)

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release connections; the default has none."""

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"

    def __getstate__(self) -> dict:  # connectors hold sockets; they are opened per process, never shipped
        raise TypeError(f"{type(self).__name__} is not picklable: open one per process with open_connector(url)")


def coalesce(requests: Sequence[ReadRequest]) -> list[tuple[str, int, list[memoryview]]]:
    """Runs of requests for adjacent ranges of the same object, in the order given: ``(key, offset, bufs)``."""
    runs: list[tuple[str, int, list[memoryview]]] = []
    end = -1
    for req in requests:
        if runs and runs[-1][0] == req.key and end == req.offset:
            runs[-1][2].append(req.buf)
        else:
            runs.append((req.key, req.offset, [req.buf]))
        end = req.offset + len(req.buf)
    return runs


def check_key(key: str) -> str:
    """Refuse keys that could escape the store root (absolute, '..', empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}: keys are relative '/'-separated names without '..'")
    return key


def refuse_options(scheme: str, options: dict) -> None:
    """A backend that takes no connector options names the ones it was given (``--password-env`` is Redis')."""
    if options:
        raise ConfigError(
            f"the {scheme} store takes no connector options, got {sorted(options)}: a password "
            "(--password-env, password_env:) applies to redis:// stores only"
        )


def joined(data: Buffer | Iterable[Buffer]) -> Buffer:
    """``write``'s data as one buffer: a buffer as it is, blocks copied one by one as they arrive (a producer may
    reuse its buffer for the next block; ``b"".join`` would hold every block it yielded first)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    out = bytearray()
    for block in data:
        out += memoryview(block)  # a view: ``+=`` with a numpy array would be numpy's broadcasting add
    return out


def short_read(key: str, offset: int, want: int, got: int, where: str) -> BackendError:
    """The error for an object shorter than the manifest says (a truncated value)."""
    return BackendError(
        f"truncated object {key!r} in {where}: wanted {want} bytes at offset {offset}, got {got}; "
        "the store is incomplete or was modified: re-publish the model"
    )
