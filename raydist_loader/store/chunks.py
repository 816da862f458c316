"""Layer 2 (store): Reading chunks into host buffers (below the worker: imports connectors and plan, never the worker).

The pieces every reader of a plan shares: a chunk's byte ranges as read requests landing back to back in a buffer,
the cut of a chunk's contiguous bytes out of a coalesced span of strided rows (in-place dim-1 shards), the grouping
of chunks that share one span, and the reading of a group in parts of whole rows through one bounded buffer (the
loads' transfers and ``raydist-loader verify``: memory stays bounded whatever the largest tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from math import prod

import numpy as np
import torch

from ..connectors import ReadRequest
from ..digest import ChunkHash
from .plan import ChunkRead, Extract, Piece, TensorSlot

#: Largest staging buffer: bigger chunks and in-place spans are read in parts of whole rows of at most this size
#: (one row, when a row is bigger), so staging stays about (concurrency + 1) x PART_BYTES per reader.
PART_BYTES = 64 << 20


def requests_for(read: ChunkRead, buf: torch.Tensor, max_bytes: int, start: int = 0) -> Iterator[ReadRequest]:
    """The chunk's pieces (their bytes back to back) from byte ``start`` on, as requests of at most ``max_bytes``
    filling ``buf`` (CPU uint8): the whole read, or one part of it when it is read in parts."""
    view, pos, end = buf.numpy(), 0, start + buf.numel()
    for piece in read.pieces:
        a, b = max(start, pos), min(end, pos + piece.nbytes)  # the part of this piece that is wanted
        for off in range(a, b, max_bytes):
            n = min(max_bytes, b - off)
            yield ReadRequest(piece.key, piece.offset + off - pos, memoryview(view[off - start : off - start + n]))
        pos += piece.nbytes
        if pos >= end:
            return


def cut(span: torch.Tensor, e: Extract, out: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk's contiguous bytes out of a coalesced span of strided rows (into the front of ``out`` if given)."""
    # as_strided's offset counts from the start of the storage, not of this view
    rows = span.as_strided((e.rows, e.length), (e.stride, 1), span.storage_offset() + e.skip)
    if out is None:
        return rows.contiguous().view(-1)
    dest = out[: e.rows * e.length]
    np.copyto(dest.numpy().reshape(e.rows, e.length), rows.numpy())  # host copy without torch's thread pool
    return dest


def shared(reads: Sequence[ChunkRead]) -> list[list[ChunkRead]]:
    """Chunks grouped by the span they are read from (in place, a rank's strided run shares one), in order."""
    groups: dict[tuple, list[ChunkRead]] = {}
    for read in reads:
        groups.setdefault((read.pieces, read.deltas), []).append(read)  # a chunk built from deltas: alone
    return list(groups.values())


def rows_of(read: ChunkRead, slot: TensorSlot) -> tuple[int, int]:
    """(rows, bytes per row) of what a read brings in, the unit parts are cut on: rows of an in-place span
    (``stride`` apart), rows of a column block of ``slot``, or the bytes of a chunk contiguous in its tensor."""
    if read.extract is not None:
        return read.extract.rows, read.extract.stride
    if read.direct:
        return read.read_bytes, 1
    outer = prod(slot.shape[: slot.dim])
    return outer, read.read_bytes // outer


def in_parts(group: Sequence[ChunkRead], part_bytes: int) -> bool:
    """One chunk, or chunks sharing one span, whose read is too big for one staging buffer."""
    return group[0].read_bytes > part_bytes and all(r.pieces == group[0].pieces for r in group)


def part_rows(read: ChunkRead, slot: TensorSlot, part_bytes: int) -> Iterator[tuple[int, int]]:
    """[first, last) rows of each part of the read, produced one at a time (a huge read never lists its parts):
    whole rows of at most ``part_bytes`` (or one row), half of that for an in-place span, whose chunks are cut out
    into the buffer's other half."""
    rows, per = _rows_per_part(read, slot, part_bytes)
    return ((r, min(rows, r + per)) for r in range(0, rows, per))


def _rows_per_part(read: ChunkRead, slot: TensorSlot, part_bytes: int) -> tuple[int, int]:
    """(rows of the read, rows per part)."""
    rows, row = rows_of(read, slot)
    budget = part_bytes // (1 if read.extract is None else 2)
    return rows, max(1, budget // max(1, row))


def stage_bytes(group: Sequence[ChunkRead], slot: TensorSlot, part_bytes: int, whole: int) -> int:
    """The staging buffer a group needs: ``whole`` (read at once), or :func:`parts_buffer_bytes` when it is read in
    parts."""
    return parts_buffer_bytes(group, slot, part_bytes) if in_parts(group, part_bytes) else whole


def parts_buffer_bytes(group: Sequence[ChunkRead], slot: TensorSlot, part_bytes: int) -> int:
    """The buffer :func:`read_in_parts` needs for a group: its largest part (twice that for an in-place span: the
    part, then each chunk's rows cut out of it)."""
    _, row = rows_of(group[0], slot)
    rows, per = _rows_per_part(group[0], slot, part_bytes)
    part = min(group[0].read_bytes, min(rows, per) * row)  # the first part is the largest
    return part if group[0].extract is None else 2 * part


#: ``place(read, first row, last row, bytes)``: what a reader does with each part of each chunk after hashing it
PlacePart = Callable[[ChunkRead, int, int, torch.Tensor], None]


def read_in_parts(
    group: Sequence[ChunkRead],
    slot: TensorSlot,
    buf: torch.Tensor,
    part_bytes: int,
    read: Callable[[list[ReadRequest]], None],
    hashes: Sequence[ChunkHash],
    place: PlacePart | None = None,
    max_request_bytes: int = 64 << 20,
) -> None:
    """Read a group part by part through ``buf`` (CPU uint8, :func:`stage_bytes` long): each part's rows of every
    chunk are fed to its hash (in order, so the digests are the whole chunks') and handed to ``place`` before the
    next part is read into the same buffer (an in-place span's chunks are cut into the buffer's second half, which
    ``place`` must be done with when it returns). ``read`` serves one batch of requests (with the caller's
    retries)."""
    first = group[0]
    _, row = rows_of(first, slot)
    for r0, r1 in part_rows(first, slot, part_bytes):
        a, b = r0 * row, min(r1 * row, first.read_bytes)
        part, scratch = buf[: b - a], buf[b - a :]
        read(list(requests_for(first, part, max_request_bytes, start=a)))
        for chunk, h in zip(group, hashes, strict=True):
            data = part if chunk.extract is None else cut(part, chunk.extract._replace(rows=r1 - r0), scratch)
            h.update(data.numpy())
            if place is not None:
                place(chunk, r0, r1, data)


def rebuild(read: ChunkRead, buf: torch.Tensor, read_many: Callable[[list[ReadRequest]], None], max_bytes: int) -> None:
    """A chunk of a version built on earlier ones (:mod:`.deltas`): its stored bytes into ``buf`` (CPU uint8 of the
    chunk's size) and its deltas with them in one batch of reads, then each delta applied in order. Raises
    :class:`~raydist_loader.errors.ManifestError` for a delta that does not decode to the chunk's size."""
    from . import deltas

    blobs = [np.empty(p.nbytes, dtype=np.uint8) for p in read.deltas]
    requests = list(requests_for(read, buf, max_bytes))
    for p, blob in zip(read.deltas, blobs, strict=True):
        requests += piece_requests(p, blob, max_bytes)
    read_many(requests)
    for p, blob in zip(read.deltas, blobs, strict=True):
        deltas.apply(buf.numpy(), blob, f"delta of chunk {read.chunk} at {p.key}@{p.offset}")


def piece_requests(piece: Piece, buf: np.ndarray, max_bytes: int) -> list[ReadRequest]:
    """One piece (a delta) into ``buf`` (uint8 of its size), as requests of at most ``max_bytes``."""
    return [ReadRequest(piece.key, piece.offset + a, memoryview(buf[a : a + max_bytes]))
            for a in range(0, piece.nbytes, max_bytes)]
