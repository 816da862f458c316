"""Reading chunks into host buffers (data layer, below the worker; imports connectors and plan, never the worker).

The pieces every reader of a plan shares: a chunk's byte ranges as read requests landing back to back in a buffer,
the cut of a chunk's contiguous bytes out of a coalesced span of strided rows (in-place dim-1 shards), the grouping
of chunks that share one span, and a plain fetch of a group (``raydist-loader verify`` and tools).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .connectors import Connector, ReadRequest
from .plan import ChunkRead, Extract


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
        groups.setdefault(read.pieces, []).append(read)
    return list(groups.values())


def fetch_chunks(conn: Connector, group: Sequence[ChunkRead]) -> list[torch.Tensor]:
    """Read a group's span once into a fresh buffer; each chunk's row-major bytes (verify and tools)."""
    buf = torch.empty(group[0].read_bytes, dtype=torch.uint8)
    conn.readinto_many(list(requests_for(group[0], buf, conn.max_request_bytes)))
    return [buf if r.extract is None else cut(buf, r.extract) for r in group]
