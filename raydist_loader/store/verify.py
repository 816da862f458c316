"""Layer 2 (store): Re-read a whole store and check every digest recorded at publish time (``raydist-loader
verify``)."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

from .. import digest
from ..connectors import open_connector
from ..errors import ConfigError, RaydistError, VerificationError, describe_failures
from ..options import MAX_CONCURRENCY, check_range
from ..pool import run_all
from .manifest import Manifest
from .plan import ChunkRead, make_plan
from .versions import read_manifest, read_manifest_bytes


@dataclass
class VerifyResult:
    """What verify checked and what it found wrong (each failure names tensor, chunk and object)."""

    model: str
    version: str
    chunks: int
    files: int
    bytes: int
    seconds: float
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def manifest_sha256(url: str, model: str, connector_options: dict | None = None, *,
                    model_version: str | None = None) -> str:
    """sha256 of the manifest bytes a load of ``model`` (``model_version``: that version; default the current one)
    uses (the stored bytes, re-rooted for a copied model): pin it with ``expect_manifest_sha256=`` to detect a
    swapped store."""
    with open_connector(url, **(connector_options or {})) as conn:
        return hashlib.sha256(read_manifest_bytes(conn, model, model_version)[1]).hexdigest()


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_pin(expected: object, where: str = "expect_manifest_sha256") -> str | None:
    """A manifest pin as given, lower-cased: None (no pin) or 64 hex digits. An empty or malformed pin is refused
    before anything is read (it would turn the check off, or read later as tampering)."""
    if expected is None:
        return None
    if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
        shown = repr(expected) if isinstance(expected, str) and len(expected) <= 80 else type(expected).__name__
        raise ConfigError(
            f"{where}: got {shown}; expected the manifest's sha256 as 64 hex digits (`raydist-loader inspect` and "
            "manifest_sha256() print it); leave it unset to load without a pin"
        )
    return expected.lower()


def check_manifest_sha256(raw: bytes, expected: str | None, where: str) -> None:
    expected = check_pin(expected)
    if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
        raise VerificationError(
            f"the manifest at {where} has sha256 {hashlib.sha256(raw).hexdigest()}, not the expected {expected}: "
            "the store was re-published or tampered with"
        )


def verify(
    url: str, model: str, *, concurrency: int = 4, raise_on_failure: bool = False,
    connector_options: dict | None = None, model_version: str | None = None,
) -> VerifyResult:
    """Read every chunk and file of ``model`` (``model_version``: that version; default the current one) and compare
    with the manifest's digests."""
    check_range("concurrency", concurrency, 1, MAX_CONCURRENCY)
    t0 = time.perf_counter()
    with open_connector(url, **(connector_options or {})) as conn:
        manifest = read_manifest(conn, model, model_version)  # a manifest refused costs no torch import
        import torch  # imported only when bytes are read

        from .chunks import PART_BYTES, parts_buffer_bytes, read_in_parts, rebuild, shared

        plan = make_plan(manifest, 1, 0, coalesce_gap=conn.coalesce_gap)

        def check(group: list[ChunkRead]) -> list[dict]:
            """Read a span (the chunks sharing it: one read) in parts of at most PART_BYTES through one buffer,
            hashing as it goes: memory stays bounded whatever the largest tensor."""
            slot = plan.tensors[group[0].tensor]
            names = [plan.tensors[r.tensor].name for r in group]  # zero-size chunks of several tensors share ()
            hashes = [digest.ChunkHash(r.xxh3, r.blake3) for r in group]
            try:
                if group[0].deltas:  # a chunk built from deltas: rebuilt whole, then hashed
                    buf = torch.empty(group[0].nbytes, dtype=torch.uint8)
                    rebuild(group[0], buf, conn.readinto_many, conn.max_request_bytes)
                    hashes[0].update(buf.numpy())
                else:
                    buf = torch.empty(parts_buffer_bytes(group, slot, PART_BYTES), dtype=torch.uint8)
                    read_in_parts(group, slot, buf, PART_BYTES, conn.readinto_many, hashes,
                                  max_request_bytes=conn.max_request_bytes)
            except RaydistError as e:
                return [
                    {"tensor": n, "chunk": r.chunk, "error": str(e), "objects": _objects(r)}
                    for n, r in zip(names, group, strict=True)
                ]
            return [
                {"tensor": name, "chunk": read.chunk, "expected": read.xxh3, "got": got, "objects": _objects(read)}
                for name, read, got in zip(names, group, (h.hexdigest() for h in hashes), strict=True)
                if got != read.xxh3
            ]

        failures = [f for group in run_all(check, shared(plan.reads), concurrency, "verify") for f in group]
        failures += _check_files(conn, manifest)
    result = VerifyResult(
        model,
        manifest.version,
        len(plan.reads),
        len(manifest.files),
        plan.bytes_read,
        time.perf_counter() - t0,
        failures,
    )
    if raise_on_failure and failures:
        raise VerificationError(describe_failures(failures), failures)
    return result


_MAX_NAMED = 8  # objects a failure names (a chunk stored in 65536 keys names its first ones and the count)


def _objects(read: ChunkRead) -> list[str]:
    keys = list(dict.fromkeys(p.key for p in (*read.pieces, *read.deltas)))
    if len(keys) <= _MAX_NAMED:
        return sorted(keys)
    return [*keys[:_MAX_NAMED], f"... and {len(keys) - _MAX_NAMED} more"]


def _check_files(conn, manifest: Manifest) -> list[dict]:
    out = []
    for name, rec in manifest.files.items():
        try:
            got = digest.xxh3(conn.read(rec.object))
        except RaydistError as e:
            out.append({"file": name, "error": str(e), "objects": [rec.object]})
            continue
        if got != rec.xxh3:
            out.append({"file": name, "expected": rec.xxh3, "got": got, "objects": [rec.object]})
    return out
