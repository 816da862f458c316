"""Layer 3 (load): An update of the weights a rank of an engine serves, moving only what changed (below the engines:
imports the worker and the transfers, never Ray).

A version built on the served one (:mod:`raydist_loader.store.deltas`) stores most chunks as a small delta, or not
at all. Where the engine's parameter holds a chunk exactly as its checkpoint bytes (a plain copy, learnt by
:mod:`raydist_loader.engines.direct` at the first load) and the served version's chunk is the new one's minus its
latest deltas, the new chunk is those bytes with the missing deltas applied: only the deltas are read. Every such
chunk is hashed and compared with the new version's digest; one that differs (a parameter the engine changed, an
engine several versions behind on another chain) is rebuilt from the store as a cold load does. A parameter on a GPU
is copied to the host for it (one device-to-host copy instead of reading the chunk from the store).
The result lands in the loader's own arena, never in the parameters: the engine applies it through its own weight
loaders once every rank has verified (verify before write).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..digest import ChunkHash
from ..errors import ManifestError
from ..pool import batches, run_all
from ..report import RankReport
from ..store import deltas
from ..store.chunks import piece_requests
from ..store.plan import ChunkRead, Piece, RankPlan, store_bytes
from .worker import ShardLoader

#: (tensor name, chunk id): names, not plan indices, so one version's plan matches the next one's
Key = tuple[str, str]


@dataclass(frozen=True)
class Served:
    """What one rank serves: the version, each chunk as its plan read it (stored bytes and deltas), and where a
    parameter holds a chunk as its checkpoint bytes (a 1-D uint8 view, or a [rows, columns] uint8 block)."""

    version: str
    reads: Mapping[Key, ChunkRead]
    places: Mapping[Key, torch.Tensor]

    @classmethod
    def of(cls, plan: RankPlan, places: Mapping[tuple[int, str], torch.Tensor] | None) -> Served:
        """From a rank's plan and the places its chunks were copied to (keyed by plan index, as the direct
        hand-off's targets are)."""
        held = {(plan.tensors[i].name, c): v for (i, c), v in (places or {}).items()}
        return cls(plan.version, _reads(plan), held)

    def kept_in(self, tensors: Iterable[torch.Tensor]) -> Served:
        """Only the places that still view the memory of one of ``tensors`` (the engine's parameters now): an
        engine that replaced a parameter after the load (repacked it, or reloaded it into new memory) serves its
        chunks from elsewhere, and a view of the old memory would keep it alive and hold stale bytes."""
        live = {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta"}
        places = {k: v for k, v in self.places.items() if v.untyped_storage().data_ptr() in live}
        return Served(self.version, self.reads, places)

    def moved_to(self, plan: RankPlan) -> Served:
        """The same parameters serving ``plan``'s version (after an update wrote it)."""
        return Served(plan.version, _reads(plan), self.places)

    def missing(self, key: Key, read: ChunkRead) -> tuple[Piece, ...] | None:
        """The deltas that turn the served chunk ``key`` into ``read``'s (none: unchanged), or None when it
        cannot be built from what is served (no place, or another stored base)."""
        old = self.reads.get(key)
        if old is None or key not in self.places or old.pieces != read.pieces or old.nbytes != read.nbytes:
            return None
        if read.deltas[: len(old.deltas)] != old.deltas:
            return None
        return read.deltas[len(old.deltas):]


def _reads(plan: RankPlan) -> dict[Key, ChunkRead]:
    return {(plan.tensors[r.tensor].name, r.chunk): r for r in plan.reads}


def pull_update(loader: ShardLoader, served: Served | None) -> RankReport:
    """Pull ``loader``'s shard whole into its arena for an update of an engine serving ``served``: chunks built
    from what is served (only their missing deltas read), the rest from the store, every chunk verified, a wrong
    one pulled again from the store; returns the report (``bytes_read``: what was really read from the store;
    ``phases["reused_chunks"]``: how many were built from the served bytes)."""
    started, t0 = time.time(), time.perf_counter()
    loader.prepare()
    loader._allocate()
    plan, transfer = loader.plan, loader._transfer
    local: list[tuple[ChunkRead, tuple[Piece, ...], torch.Tensor]] = []
    cold: list[ChunkRead] = []
    for r in plan.reads:
        key = (plan.tensors[r.tensor].name, r.chunk)
        extra = served.missing(key, r) if served is not None and r.nbytes else None
        if extra is None:
            cold.append(r)
        else:
            local.append((r, extra, served.places[key]))
    digests = loader._pull(cold)  # also views the arena as the tensors
    blobs = _read_deltas(loader, [p for _, extra, _ in local for p in extra])
    built = run_all(lambda item: _built(transfer, *item, blobs), local, loader._concurrency or 4,
                    f"rank{loader.rank}")
    digests.update(zip(((r.tensor, r.chunk) for r, _, _ in local), built, strict=True))
    wrong = [r for r in plan.reads if digests.get((r.tensor, r.chunk)) != r.xxh3]
    if wrong:  # from the store, as a cold load reads them
        digests.update(loader._pull(wrong))
    loader._digests = digests
    report = loader._report(started, time.perf_counter() - t0, repulled=len(wrong))
    cold_keys = {(r.tensor, r.chunk) for r in cold}
    redone = [r for r in wrong if (r.tensor, r.chunk) not in cold_keys]  # served bytes that did not hash right
    report.bytes_read = store_bytes(cold) + sum(p.nbytes for p in blobs) + store_bytes(redone)
    report.phases["reused_chunks"] = float(len(local) - len(redone))
    return report


def _read_deltas(loader: ShardLoader, pieces: list[Piece]) -> dict[Piece, np.ndarray]:
    """Every delta piece, read in batches of about 16 MiB (one ``readinto_many`` each: pipelined on Redis)."""
    unique = list(dict.fromkeys(pieces))
    blobs = {p: np.empty(p.nbytes, dtype=np.uint8) for p in unique}
    conn, transfer = loader.connector, loader._transfer
    step = conn.max_request_bytes

    def read(batch: list[Piece]) -> None:
        transfer._read(conn, [q for p in batch for q in piece_requests(p, blobs[p], step)])

    run_all(read, batches(unique, 16 << 20, lambda p: p.nbytes), loader._concurrency or 4, f"rank{loader.rank}")
    return blobs


def _built(transfer, read: ChunkRead, extra: tuple[Piece, ...], place: torch.Tensor,
           blobs: dict[Piece, np.ndarray]) -> str:
    """The chunk rebuilt from the bytes its parameter holds and its ``extra`` deltas, placed in the arena; its
    digest (always computed: the served bytes are trusted only once they hash to the new version's digest)."""
    region = transfer.region(read)
    buf = region if region.dim() == 1 else torch.empty(read.nbytes, dtype=torch.uint8)
    np.copyto(buf.view(place.shape).numpy(), place.detach().cpu().numpy())  # a GPU parameter: one copy to the host
    try:
        for p in extra:
            deltas.apply(buf.numpy(), blobs[p], f"delta of chunk {read.chunk} at {p.key}@{p.offset}")
    except ManifestError as e:
        return f"undecodable delta ({e})"
    if buf is not region:
        transfer._place(read, buf)
    h = ChunkHash(read.xxh3, read.blake3, check=True)
    h.update(buf.numpy())
    return h.hexdigest()
