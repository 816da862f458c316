"""Layer 2 (store): Read and write the safetensors container without staging whole files.

Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__"}``,
then the data. We stream data block by block (publish) and read headers through any connector (index, inspect), so
neither side ever holds a whole file in memory; files we write open with any safetensors tool.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .. import dtypes
from ..connectors.base import Connector
from ..errors import ManifestError

_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: dtype (manifest name), shape, absolute byte offset and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(connector: Connector, key: str) -> list[Entry]:
    """The tensors of safetensors object ``key``, with absolute offsets, in file order."""
    head = bytearray(8)
    connector.readinto(key, 0, memoryview(head))
    (size,) = struct.unpack("<Q", head)
    if size > _MAX_HEADER:
        raise ManifestError(f"{key}: safetensors header of {size} bytes is implausible; the file is not safetensors")
    raw = bytearray(size)
    connector.readinto(key, 8, memoryview(raw))
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{key}: safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    base = 8 + size
    entries = [
        Entry(
            name,
            dtypes.from_safetensors(v["dtype"]),
            tuple(v["shape"]),
            base + v["data_offsets"][0],
            v["data_offsets"][1] - v["data_offsets"][0],
        )
        for name, v in header.items()
    ]
    return sorted(entries, key=lambda e: e.offset)


def layout(
    items: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """Header bytes for tensors ``(name, dtype, shape, nbytes)`` stored in the given order.

    Returns the 8-byte length + padded JSON header, and each name's absolute data offset in the file.
    """
    header: dict[str, object] = {}
    rel: dict[str, int] = {}
    pos = 0
    for name, dtype, shape, nbytes in items:
        header[name] = {
            "dtype": dtypes.to_safetensors(dtype),
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        rel[name] = pos
        pos += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + off for name, off in rel.items()}


def stream(prefix: bytes, blocks: Iterable[memoryview | bytes]) -> Iterator[memoryview | bytes]:
    """The file's byte blocks: header, then each tensor's bytes in layout order."""
    yield prefix
    yield from blocks
