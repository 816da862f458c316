"""Chunk and rank digests: xxh3-128 of row-major bytes (fast), optional blake3 (tamper evidence).

Both hashers release the GIL on large buffers, so hashing overlaps with reads in other threads.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

from .errors import MissingDependencyError


def xxh3(data: memoryview | bytes) -> str:
    """xxh3-128 hex digest of a byte buffer."""
    return xxhash.xxh3_128_hexdigest(data)


def blake3_hex(data: memoryview | bytes) -> str:
    """blake3 hex digest (needs the ``blake3`` extra)."""
    try:
        from blake3 import blake3
    except ImportError:
        raise MissingDependencyError(
            "blake3 digests need the 'blake3' extra: pip install 'raydist-loader[blake3]'"
        ) from None
    return blake3(data, max_threads=1).hexdigest()


def rank_digest(chunk_digests: Iterable[str]) -> str:
    """The digest of a rank: xxh3-128 over its chunk digests in plan order."""
    h = xxhash.xxh3_128()
    for d in chunk_digests:
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()
