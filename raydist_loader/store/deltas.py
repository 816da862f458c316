"""Layer 2 (store): chunk deltas, the storage model of RL weight updates: a chunk of a new version is the chunk an
earlier version stored, XOR'ed with compressed deltas (``zstd(new XOR old)``), one per version since.

At RL learning rates a step changes a few percent of the bf16 elements, spread over nearly every chunk, so chunk
dedup alone saves little; the XOR of two versions' bytes is then mostly zero bytes and compresses to a few percent.
Which chunks a version stores whole, as a delta or not at all is the publisher's (:mod:`.updates`); this module is
the codec both ends share and the rule that bounds a chain:

* :func:`encode` / :func:`apply`: ``zstd(new XOR old)``, and its inverse applied in place. A delta's frame must
  declare exactly the chunk's size: a damaged or hostile delta never makes a reader allocate more than its chunk.
* :class:`ChainPolicy`: a chunk is stored whole again every ``full_every`` versions, or when its deltas would add
  up to more than ``max_delta_fraction`` of it, so a cold load reads at most about 1.5x its shard and a chain
  names a bounded number of versions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from ..errors import ConfigError, ManifestError

#: zstd level: 1 compresses a step's XOR (mostly zero bytes) to about 8% at 7% of elements changed; higher levels
#: gain ~1% for half the speed
LEVEL = 1
_local = threading.local()  # zstandard's (de)compressors are not thread-safe: one of each per thread


def _codec() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    codec = getattr(_local, "codec", None)
    if codec is None:
        codec = _local.codec = (zstandard.ZstdCompressor(level=LEVEL), zstandard.ZstdDecompressor())
    return codec


def _words(data: np.ndarray) -> np.ndarray:
    """``data`` (uint8, contiguous) as 8-byte words when its length allows: XOR runs ~4x faster on them."""
    return data.view(np.uint64) if data.nbytes % 8 == 0 and data.ctypes.data % 8 == 0 else data


def xor(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``new XOR old`` of two chunks' bytes (uint8, same length), as uint8."""
    if new.nbytes != old.nbytes:
        raise ValueError(f"a delta is between chunks of one size: {new.nbytes} and {old.nbytes} bytes")
    a, b = _words(np.ascontiguousarray(new)), _words(np.ascontiguousarray(old))
    if a.dtype != b.dtype:
        a, b = a.view(np.uint8), b.view(np.uint8)
    return np.bitwise_xor(a, b).view(np.uint8)


def encode(difference: np.ndarray) -> bytes:
    """The stored delta of a chunk whose bytes changed by ``difference`` (:func:`xor` of new and old)."""
    return _codec()[0].compress(difference)


def apply(buf: np.ndarray, delta: bytes | memoryview, where: str) -> None:
    """XOR the delta into ``buf`` (uint8: the chunk's bytes before it), in place. A delta that does not decode to
    exactly ``buf``'s size is refused (``where`` names it) before anything is allocated or changed."""
    try:
        size = zstandard.frame_content_size(delta)
    except zstandard.ZstdError as e:
        raise ManifestError(f"{where}: not a delta ({e}): the store is damaged: re-publish the model") from None
    if size < 0 or size == zstandard.CONTENTSIZE_UNKNOWN:
        raise ManifestError(f"{where}: the delta's frame declares no content size (not written by raydist-loader): "
                            "the store is damaged: re-publish the model")
    if size != buf.nbytes:
        raise ManifestError(f"{where}: the delta decodes to {size} bytes, its chunk has {buf.nbytes}: the store is "
                            "damaged (or its manifest does not describe it): re-publish the model")
    try:
        plain = _codec()[1].decompress(delta, max_output_size=buf.nbytes)
    except zstandard.ZstdError as e:
        raise ManifestError(f"{where}: the delta does not decode ({e}): the store is damaged: re-publish the "
                            "model") from None
    d = np.frombuffer(plain, dtype=np.uint8)
    a, b = _words(buf), _words(d)
    if a.dtype != b.dtype:
        a, b = buf, d
    np.bitwise_xor(a, b, out=a)


@dataclass(frozen=True)
class ChainPolicy:
    """When a changed chunk is stored whole rather than as a delta.

    ``full_every``: a chunk is stored whole at least every this many versions (1: never a delta), which also
    bounds how many versions a version names (its chain). ``max_delta_fraction``: a chunk is stored whole when its
    deltas since it last was would add up to more than this fraction of it: a cold load of a chunk reads at most
    ``1 + max_delta_fraction`` times its bytes."""

    full_every: int = 8
    max_delta_fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.full_every, bool) or not isinstance(self.full_every, int) or not 1 <= self.full_every <= 64:
            raise ConfigError(f"full_every: got {self.full_every!r}; expected an integer in 1..64 (versions)")
        fraction = self.max_delta_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"max_delta_fraction: got {fraction!r}; expected a fraction in (0, 1]")

    def stored_whole(self, age: int, held: int, delta: int, nbytes: int) -> bool:
        """Store the chunk whole: it was stored whole ``age`` versions ago, its deltas since add up to ``held``
        bytes, and this version's would be ``delta`` bytes of a chunk of ``nbytes``."""
        return age + 1 >= self.full_every or held + delta > self.max_delta_fraction * nbytes
