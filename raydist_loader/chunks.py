"""Reading chunks into host buffers (data layer, below the worker; imports connectors and plan, never the worker).

The pieces every reader of a plan shares: a chunk's byte ranges as read requests landing back to back in a buffer,
the cut of a chunk's contiguous bytes out of a coalesced span of strided rows (in-place dim-1 shards), the grouping
of chunks that share one span, and a plain fetch of a group (``raydist-loader verify`` and tools).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .connectors import Connector, ReadRequest
from .plan import ChunkRead, Extract


def requests_for(read: ChunkRead, buf: torch.Tensor, max_bytes: int) -> Iterator[ReadRequest]:
    """The chunk's pieces as requests of at most ``max_bytes``, landing back to back in ``buf`` (CPU uint8)."""
    view, pos = buf.numpy(), 0
    for piece in read.pieces:
        for off in range(0, piece.nbytes, max_bytes):
            n = min(max_bytes, piece.nbytes - off)
            yield ReadRequest(piece.key, piece.offset + off, memoryview(view[pos : pos + n]))
            pos += n


def cut(span: torch.Tensor, e: Extract) -> torch.Tensor:
    """The chunk's contiguous bytes out of a coalesced span of strided rows."""
    # as_strided's offset counts from the start of the storage, not of this view
    return span.as_strided((e.rows, e.length), (e.stride, 1), span.storage_offset() + e.skip).contiguous().view(-1)


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
