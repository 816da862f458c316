"""Layer 3 (load): CPU copy path (below the worker: extends transfer.py): reads land straight in the rank's
arena.

Contiguous chunks are read straight into the tensors; column blocks and in-place extracts ride in the same batches
into a staging slot, then are cut, hashed and copied into place. Batches follow object and offset order, so
back-to-back ranges are one request. Staged reads larger than a slot go through a ring of two buffers, in parts of
at most :data:`~raydist_loader.store.chunks.PART_BYTES`: staging stays bounded whatever the largest tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..connectors import Connector, ReadRequest
from ..pool import run_all
from ..store.chunks import cut, requests_for, shared
from ..store.plan import ChunkRead
from .transfer import Ring, Transfer


@dataclass
class _Landing:
    """Where one chunk's read buffer lives while it is in flight."""

    read: ChunkRead
    buffer: torch.Tensor  # uint8: the chunk's place in the rank's arena
    pending: int  # requests not yet landed


class CpuTransfer(Transfer):
    """Fills a CPU arena."""

    def _pull(self, reads: Sequence[ChunkRead], concurrency: int) -> dict[tuple[int, str], str]:
        """CPU: contiguous chunks are read straight into the tensors; column blocks and in-place extracts ride in
        the same batches into a staging slot (one per thread, ``max_request_bytes``), then are cut, hashed and
        copied into place. Batches follow object and offset order, so back-to-back ranges are one request.
        Staged chunks larger than a slot go alone through a ring of their own."""
        conn = self.connector
        limit = min(conn.max_request_bytes, self.part_bytes)
        direct = [_Landing(r, self._region(r), 0) for r in reads if self._arena_run(r)]
        groups = shared([r for r in reads if not self._arena_run(r)])
        staged = [g for g in groups if g[0].read_bytes <= limit]
        big = [g for g in groups if g[0].read_bytes > limit]
        batches = _batches(direct, staged, limit)
        # a slot holds one batch's staged chunks: sized to the most any batch stages, not to a whole batch (fresh
        # staging pages cost a first touch each, as the arena's do)
        need = max((sum(g[0].read_bytes for g in b.staged) for b in batches), default=0)
        slots = Ring(min(concurrency, sum(1 for b in batches if b.staged)), need, pin=False)
        ring = Ring(min(2, len(big)), max((self._stage_size(g, g[0].read_bytes) for g in big), default=0), pin=False)
        digests: dict[tuple[int, str], str] = {}

        def run(task: _Batch | list[ChunkRead]) -> None:
            if isinstance(task, list):
                digests.update(self._staged_group(task, ring, conn))
            else:
                digests.update(self._run_batch(task, slots, conn))

        run_all(run, [*batches, *big], concurrency, f"rank{self.rank}")
        return digests

    def _run_batch(self, batch: _Batch, slots: Ring, conn: Connector) -> dict[tuple[int, str], str]:
        """One batch: direct requests and whole staged chunks, read with one ``readinto_many``."""
        requests = [req for _, req in batch.direct]
        slot = slots.acquire() if batch.staged else None
        views, pos = [], 0
        try:
            for group in batch.staged:
                views.append(slot[pos : pos + group[0].read_bytes])
                requests.extend(requests_for(group[0], views[-1], conn.max_request_bytes))
                pos += group[0].read_bytes
            requests.sort(key=lambda q: (q.key, q.offset))
            self._read(conn, requests)
            out = {}
            for group, view in zip(batch.staged, views, strict=True):
                for read in group:
                    chunk = view if read.extract is None else cut(view, read.extract)
                    out[(read.tensor, read.chunk)] = self._hash(chunk, read)
                    self._place(read, chunk)
        finally:
            if slot is not None:
                slots.release(slot, None)
        with self._lock:
            self._done += sum(r.nbytes for g in batch.staged for r in g)
        for landing, req in batch.direct:
            with self._lock:
                landing.pending -= 1
                self._done += len(req.buf)
                finished = landing.pending == 0
            if finished:
                out[(landing.read.tensor, landing.read.chunk)] = self._hash(landing.buffer, landing.read)
        return out

    def _staged_group(self, group: list[ChunkRead], ring: Ring, conn: Connector) -> dict[tuple[int, str], str]:
        """Chunks sharing one span too big for a batch slot: read it once through the ring (in parts when it is
        bigger than a ring buffer), cut each."""
        buf = ring.acquire()
        try:
            if self._in_parts(group):
                digests = self._stream(group, buf, conn, self._place_rows)
            else:
                digests, copy = self._stage(group, buf[: group[0].read_bytes], conn)
                copy()
        finally:
            ring.release(buf, None)
        with self._lock:
            self._done += sum(r.nbytes for r in group)
        return {(r.tensor, r.chunk): d for r, d in zip(group, digests, strict=True)}


@dataclass
class _Batch:
    """What one thread reads in one go: requests landing in the tensors, and whole staged chunks."""

    direct: list[tuple[_Landing, ReadRequest]]
    staged: list[list[ChunkRead]]  # groups of chunks sharing one read
    size: int = 0


def _batches(landings: list[_Landing], staged: list[list[ChunkRead]], max_bytes: int) -> list[_Batch]:
    """Cut every direct chunk into requests of at most ``max_bytes``, and group them with the (whole) staged
    chunks, in object and offset order, into batches of about ``max_bytes``: big chunks are read by several
    threads, and chunks back to back in one object (a rank's slot file) become one request."""
    units: list[tuple[tuple[str, int], int, object]] = []
    for landing in landings:
        for req in requests_for(landing.read, landing.buffer, max_bytes):
            landing.pending += 1
            units.append(((req.key, req.offset), len(req.buf), (landing, req)))
    units += [((g[0].pieces[0].key, g[0].pieces[0].offset), g[0].read_bytes, g) for g in staged if g[0].pieces]
    units.sort(key=lambda u: u[0])
    batches = [_Batch([], [])]
    for _, size, unit in units:
        if batches[-1].size and batches[-1].size + size > max_bytes:
            batches.append(_Batch([], []))
        if isinstance(unit, list):
            batches[-1].staged.append(unit)
        else:
            batches[-1].direct.append(unit)
        batches[-1].size += size
    return [b for b in batches if b.size or b.direct or b.staged]
