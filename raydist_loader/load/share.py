"""Layer 3 (load): Replicas share one pull, the actor's side (imports plan, worker, transfer; never Ray).

With ``replicas=R`` the same rank of R data-parallel copies of a TP group needs the same bytes. The rank's plan is
cut into R stripes (:func:`stripes`, the same cut on every replica): replica i reads stripe i from the store, in
parts of about ``part_bytes``, verifies each part (re-pulling its wrong chunks once) and exports it; the other
replicas accept the part, hash every chunk they placed and keep the digests. A peer is never trusted:
:meth:`ReplicaShard.complete` reads from the store whatever never arrived, re-pulls once whatever arrived wrong, and
reports exactly like a plain load, so the coordinator checks every replica's rank digest against the manifest.

How parts travel between processes (Ray's object store) is :mod:`~raydist_loader.driver.replicas`' business; here a part
is a list of host uint8 arrays, so the whole exchange also runs (and is tested) in one process without Ray.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..report import RankReport
from ..store.plan import ChunkRead, RankPlan, store_bytes
from .worker import ShardLoader

#: Target size of one shared part (one object in Ray's object store): big enough that per-object costs vanish,
#: small enough that peers start copying while the owner still reads and that few parts are pinned at once.
PART_BYTES = 64 << 20

#: A stripe: per replica, its parts; a part: indices into ``RankPlan.reads``.
Stripes = list[list[list[int]]]


def stripes(plan: RankPlan, replicas: int, part_bytes: int = PART_BYTES) -> Stripes:
    """Cut a rank's reads among ``replicas`` by store bytes, in plan order, so each replica reads one contiguous
    stretch (back-to-back ranges stay one request) and about 1/R of the bytes. Chunks read from one span (in place)
    and the column blocks of one tensor stay together. Zero-size chunks are in no stripe (nothing to read)."""
    units = _units(plan.reads)
    sizes = [store_bytes([plan.reads[i] for i in unit]) for unit in units]
    total = sum(sizes) or 1
    owned: list[list[list[int]]] = [[] for _ in range(replicas)]
    done = 0
    for unit, size in zip(units, sizes, strict=True):
        owner = min(replicas - 1, int(replicas * (done + size / 2) / total))
        owned[owner].append(unit)
        done += size
    return [_parts(plan, units_of, part_bytes) for units_of in owned]


def _units(reads: Sequence[ChunkRead]) -> list[list[int]]:
    """Indices of reads that must go to one replica together: a shared span, or one tensor's column blocks."""
    units: list[list[int]] = []
    for i, read in enumerate(reads):
        if not read.nbytes:
            continue
        last = reads[units[-1][-1]] if units else None
        columns = last is not None and not last.direct and not read.direct and last.tensor == read.tensor
        if last is not None and (last.pieces == read.pieces or columns):
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _parts(plan: RankPlan, units: list[list[int]], part_bytes: int) -> list[list[int]]:
    parts: list[list[int]] = []
    size = part_bytes
    for unit in units:
        if size >= part_bytes:
            parts.append([])
            size = 0
        parts[-1].extend(unit)
        size += sum(plan.reads[i].nbytes for i in unit)
    return parts


class ReplicaShard(ShardLoader):
    """One rank of one replica when replicas share the pull: reads its stripe, exports it, accepts the others'.

    Call order (the coordinator's, or a test's): :meth:`pull_part` and :meth:`export_part` for each of its own parts,
    :meth:`take_part` for each part of the other replicas (any order, from several threads), then :meth:`complete`.
    :meth:`load` still loads the whole shard alone (a restarted actor does that)."""

    def __init__(self, *args, replica: int = 0, replicas: int = 1, part_bytes: int = PART_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.replica, self.replicas, self.part_bytes = replica, replicas, part_bytes
        self.stripes: Stripes | None = None
        self._share_lock = threading.Lock()
        self._from_store = self._from_peers = self._repulled = 0
        # seconds: reading own parts from the store; placing and hashing the peers' parts (+ the transport's own)
        self._spent = {"pull_s": 0.0, "take_s": 0.0}
        self._clock: tuple[float, float] | None = None  # (wall clock, perf counter) when the share started
        # part -> the transport's handle of it (driver.replicas: its ObjectRef), held until every peer has it
        # (``_exported.pop(part)``) or the load ends: complete() and load() release any left, success or failure
        self._exported: dict[int, object] = {}

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, replica={self.replica}/{self.replicas})"

    def prepare(self) -> dict:
        node = super().prepare()
        if self.stripes is None:
            self.stripes = stripes(self.plan, self.replicas, self.part_bytes)
        return node

    def parts(self) -> int:
        """How many parts this replica reads and exports."""
        self.prepare()
        return len(self.stripes[self.replica])

    def load(self) -> RankReport:
        """The whole shard from the store, alone (a restarted actor; peers are not waited for)."""
        with self._share_lock:
            self._exported.clear()
        return self._tag(super().load(), from_store=None)

    def pull_part(self, part: int) -> None:
        """Read part ``part`` of this replica's stripe from the store; hash, and re-pull its wrong chunks once, so
        that what is shared was checked here first."""
        reads = self._reads(self.replica, part)
        t0 = time.perf_counter()
        got = self._pull(reads)
        wrong = [r for r in reads if got[(r.tensor, r.chunk)] != r.xxh3] if self.verify else []
        if wrong:
            got.update(self._pull(wrong))
        with self._share_lock:
            self._digests.update(got)
            self._from_store += store_bytes(reads) + store_bytes(wrong)
            self._repulled += len(wrong)
            self._spent["pull_s"] += time.perf_counter() - t0

    def export_part(self, part: int) -> list[np.ndarray]:
        """Part ``part`` of this replica's stripe as host uint8 arrays (views of the arena on CPU)."""
        transfer = self._transfer
        return [transfer.export(run).numpy() for run in transfer.runs(self._reads(self.replica, part))]

    def take_part(self, owner: int, part: int, arrays: Sequence[np.ndarray]) -> int:
        """Place part ``part`` of replica ``owner``'s stripe and hash every chunk as it is held here. Returns the
        number of chunks whose digest differs from the manifest (:meth:`complete` re-pulls them)."""
        reads = self._reads(owner, part)
        t0 = time.perf_counter()
        runs = self._transfer.runs(reads)
        if len(arrays) != len(runs):
            raise ValueError(f"part {part} of replica {owner} has {len(arrays)} runs; rank {self.rank} expects "
                             f"{len(runs)}")
        got = {}
        for run, array in zip(runs, arrays, strict=True):
            with warnings.catch_warnings():  # read-only buffers (Ray's object store) are only read here
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(np.asarray(array, dtype=np.uint8).reshape(-1))
            for read, chunk in zip(run, self._transfer.accept(run, data), strict=True):
                got[(read.tensor, read.chunk)] = self._hash(chunk, read)
        with self._share_lock:
            self._digests.update(got)
            self._from_peers += sum(r.nbytes for r in reads)
            self._spent["take_s"] += time.perf_counter() - t0
        return sum(got[(r.tensor, r.chunk)] != r.xxh3 for r in reads)

    def complete(self) -> RankReport:
        """Read from the store every chunk that never arrived (a peer died, an object was lost), re-pull once
        every chunk whose digest is wrong (from a peer or the store), and report as a plain load does. Every part
        still exported is released, whatever happens."""
        try:
            return self._complete()
        finally:
            with self._share_lock:
                self._exported.clear()

    def _complete(self) -> RankReport:
        self._begin()
        t0 = time.perf_counter()
        plan = self.plan
        missing = [r for r in plan.reads if (r.tensor, r.chunk) not in self._digests]
        if missing:
            self._digests.update(self._pull(missing))
        wrong = [r for r in plan.reads if self._digests[(r.tensor, r.chunk)] != r.xxh3] if self.verify else []
        if wrong:
            self._digests.update(self._pull(wrong))
        self._from_store += store_bytes(missing) + store_bytes(wrong)
        started, begun = self._clock
        self._phases = {**self._spent, "complete_s": time.perf_counter() - t0}
        report = self._report(started, time.perf_counter() - begun, repulled=self._repulled + len(wrong))
        return self._tag(report, from_store=self._from_store)

    # ---------------------------------------------------------------- internals
    def _spend(self, phase: str, seconds: float) -> None:
        """Add to a phase of this rank's report (the transport's own steps too, e.g. ``put_s``)."""
        with self._share_lock:
            self._spent[phase] = self._spent.get(phase, 0.0) + seconds

    def _begin(self) -> None:
        """Once: plan, stripes, the arena, and the digests of zero-size chunks (nothing to read or share)."""
        with self._share_lock:
            if self._clock is not None:
                return
            self._clock = (time.time(), time.perf_counter())
            self.prepare()
            self._allocate()
            self._digests.update(self._pull([r for r in self.plan.reads if not r.nbytes]))

    def _reads(self, owner: int, part: int) -> list[ChunkRead]:
        self._begin()
        return [self.plan.reads[i] for i in self.stripes[owner][part]]

    def _tag(self, report: RankReport, from_store: int | None) -> RankReport:
        """This replica's index on the report and on each failure; store bytes as read, and bytes from peers."""
        report.replica = self.replica
        report.failures = [{"replica": self.replica, **f} for f in report.failures]
        if from_store is not None:
            report.bytes_read = from_store
            report.bytes_from_peers = self._from_peers
        return report
