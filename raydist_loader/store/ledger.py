"""Layer 2 (store): What one publish wrote: every object and its size, confirmed in one pass before the manifest swap
and removed if the publish fails, so a failed publish never looks like a success nor leaves a half version behind."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

from ..connectors.base import Buffer, Connector
from ..errors import BackendError

log = logging.getLogger(__name__)


class WriteLedger:
    """Writes of one publish, with every object's size: confirmed before the swap, removed if the publish fails."""

    def __init__(self, conn: Connector):
        self.conn = conn
        self.sizes: dict[str, int | None] = {}  # None: the write did not finish
        self._lock = threading.Lock()

    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        with self._lock:
            self.sizes[key] = None
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.conn.write(key, data)
            n = memoryview(data).nbytes
        else:
            counted = [0]
            self.conn.write(key, _counting(data, counted))
            n = counted[0]
        with self._lock:
            self.sizes[key] = n

    def write_many(self, items: list[tuple[str, Buffer]]) -> None:
        """Several whole objects with one ``Connector.write_many`` (pipelined on Redis)."""
        with self._lock:
            self.sizes.update((key, None) for key, _ in items)
        self.conn.write_many(items)
        with self._lock:
            self.sizes.update((key, memoryview(data).nbytes) for key, data in items)

    def confirm(self) -> None:
        """One cheap pass (pipelined EXISTS/STRLEN, HEAD, stat): every object is there with the size written."""
        keys = sorted(self.sizes)
        found = self.conn.stat_many(keys)
        wrong = [(k, self.sizes[k], got) for k, got in zip(keys, found, strict=True) if got != self.sizes[k]]
        if wrong:
            missing = sum(got is None for _, _, got in wrong)
            key, size, got = wrong[0]
            raise BackendError(
                f"{len(wrong)} of the {len(keys)} objects written are not in the store as written ({missing} "
                f"missing, e.g. {key!r}: wrote {size} bytes, found {'none' if got is None else got}); the store "
                "dropped them (eviction, a full disk, another writer or gc)"
            )

    def remove(self) -> int:
        """Best effort: delete everything this publish wrote (an error here must not hide the first one)."""
        removed = 0
        for key in sorted(self.sizes):
            try:
                self.conn.delete(key)
                removed += 1
            except Exception:  # noqa: BLE001 - best effort; the original error is what the user needs
                log.debug("could not remove %s", key, exc_info=True)
        return removed


def _counting(blocks: Iterable, counted: list[int]) -> Iterator:
    for block in blocks:
        counted[0] += memoryview(block).nbytes
        yield block
