"""Layer 0 (base): Chunk and rank digests: xxh3-128 of row-major bytes (fast), optional blake3 (tamper evidence).

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
    h = _blake3()
    h.update(data)
    return h.hexdigest()


class ChunkHash:
    """The digest of one chunk whose bytes are fed in order, whole or part by part (a chunk larger than a staging
    buffer arrives in parts): xxh3-128, and where the manifest records blake3 (tamper evidence) that too, a blake3
    mismatch being reported as a digest that cannot equal the expected one. With ``check=False`` (a load with
    ``verify=False``) nothing is hashed and the expected digest is returned."""

    def __init__(self, expected_xxh3: str | None = None, expected_blake3: str | None = None, *, check: bool = True):
        self._expected = expected_xxh3
        self._xxh3 = xxhash.xxh3_128() if check or expected_xxh3 is None else None
        self._blake3 = _blake3() if expected_blake3 and self._xxh3 is not None else None
        self._expected_blake3 = expected_blake3

    def update(self, data: memoryview | bytes) -> None:
        """Feed the next bytes of the chunk (anything with the buffer protocol: a numpy array, a memoryview)."""
        if self._xxh3 is not None:
            self._xxh3.update(data)
        if self._blake3 is not None:
            self._blake3.update(data)

    def hexdigest(self) -> str:
        if self._xxh3 is None:
            return self._expected
        got = self._xxh3.hexdigest()
        if self._blake3 is not None and got == self._expected and self._blake3.hexdigest() != self._expected_blake3:
            return f"blake3-mismatch:{got}"
        return got


def _blake3():
    try:
        from blake3 import blake3
    except ImportError:
        raise MissingDependencyError(
            "blake3 digests need the 'blake3' extra: pip install 'raydist-loader[blake3]'"
        ) from None
    return blake3(max_threads=1)


def rank_digest(chunk_digests: Iterable[str]) -> str:
    """The digest of a rank: xxh3-128 over its chunk digests in plan order."""
    h = xxhash.xxh3_128()
    for d in chunk_digests:
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()
