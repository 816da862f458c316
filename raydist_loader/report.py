"""Layer 0 (base): Reports (imports only errors): what each rank did (:class:`RankReport`) and what a whole load did
(:class:`LoadReport`).

Data flows one way: an actor builds its RankReport, the coordinator gathers them, the API wraps them in a
LoadReport, the CLI prints or writes it. Both are plain dataclasses (picklable across Ray, typed for callers, the
model being Ray Train's ``WorkerMetadata``); the JSON report is :meth:`LoadReport.to_dict` (``dataclasses.asdict``),
so its field names are these field names. Failures stay JSON-shaped records (``rank``, ``tensor``, ``chunk``,
``expected``, ``got``), the same records ``raydist-loader verify`` reports and :func:`describe_failures` prints.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import VerificationError, describe_failures


@dataclass
class RankReport:
    """One rank's load: where it ran, what it moved, how long it took and what its digests were."""

    rank: int
    tp: int
    model: str
    version: str
    host: str
    node_id: str | None  # Ray node id; None outside Ray
    gpu_ids: list[str]
    device: str
    store: str  # redacted URL
    bytes: int  # shard bytes kept
    bytes_read: int  # bytes read from the store (in-place dim-1 shards read whole row spans; with replicas, its share)
    staged_bytes: int  # bytes that went through a staging buffer (column blocks, in-place extracts)
    chunks: int
    started: float  # wall clock (time.time()) when the load started
    finished: float
    seconds: float  # load time, the one re-pull included
    gbps: float
    verify: bool | str
    digest: str  # over the chunk digests as landed, in plan order
    expected_digest: str  # the same over the manifest's digests
    failures: list[dict[str, Any]] = field(default_factory=list)  # chunks still wrong after the re-pull
    errors: list[str] = field(default_factory=list)
    #: plan_s, alloc_s, pull_s (first pull), verify_s; load_shard adds manifest_s (store opened, manifest read)
    phases: dict[str, float] = field(default_factory=dict)
    repulled: int = 0  # chunks re-pulled after a digest mismatch
    restarts: int = 0  # times the coordinator restarted this rank's actor
    replica: int = 0  # which data-parallel copy of the TP group (``replicas=``)
    bytes_from_peers: int = 0  # bytes received from the same rank of the other replicas (then verified here)

    @property
    def verified(self) -> bool:
        """Every chunk's digest matched (after the one re-pull)."""
        return not self.failures and self.digest == self.expected_digest


@dataclass
class LoadTotal:
    """The aggregate: GB/s = all shard bytes / (last rank done - first read started)."""

    bytes: int
    bytes_read: int  # from the store: one copy of the shards when replicas share
    seconds: float
    gbps: float
    time_to_ready_s: float  # Ray start, placement, actors up with their plans made
    bytes_from_peers: int = 0  # moved between replicas through Ray's object store
    call_to_verified_s: float = 0.0  # the whole call: from load_across_cluster() to a verified model


#: The phases of a load; manifest and connect overlap (the expected digests are computed while Ray connects).
PHASES = ("manifest", "connect", "placement", "actors", "pull", "verify")


@dataclass
class Phase:
    """One step of a load as a span in seconds since the call (``load_across_cluster()``) began."""

    name: str  # one of PHASES
    start_s: float
    end_s: float

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


class PhaseClock:
    """Records a load's phases as spans in seconds since it was made (the call's start)."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.spans: dict[str, tuple[float, float]] = {}

    def now(self) -> float:
        return time.time() - self.t0

    def since(self, wall: float) -> float:
        """A ``time.time()`` value as seconds since the start."""
        return wall - self.t0

    def span(self, name: str, start_s: float, end_s: float) -> None:
        self.spans[name] = (start_s, end_s)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (recorded also when it raises)."""
        start = self.now()
        try:
            yield
        finally:
            self.span(name, start, self.now())

    def phases(self) -> list[Phase]:
        """The recorded spans in :data:`PHASES` order."""
        return [Phase(name, *self.spans[name]) for name in PHASES if name in self.spans]


@dataclass
class LoadReport:
    """A whole load: every rank's report, ordered by replica then rank, plus the aggregate."""

    model: str
    version: str
    tp: int
    store: str  # redacted URL
    ranks: list[RankReport]
    verified: bool
    total: LoadTotal
    replicas: int = 1
    #: Where the time went, call to verified: manifest (read, validated; expected digests), connect (to Ray),
    #: placement (group ready), actors (started, store opened, plans made), pull, verify (compare, re-pull, check).
    phases: list[Phase] = field(default_factory=list)

    @classmethod
    def gather(
        cls, ranks: Sequence[RankReport], ready_s: float, verified: bool, phases: Sequence[Phase] = ()
    ) -> LoadReport:
        """Aggregate rank reports (ordered by replica, then rank) of one load; ``phases`` as measured by the
        caller."""
        first = ranks[0]
        started = min(r.started for r in ranks)
        seconds = max(max(r.finished for r in ranks) - started, 1e-9)
        nbytes = sum(r.bytes for r in ranks)
        whole = max((p.end_s for p in phases), default=0.0)
        total = LoadTotal(nbytes, sum(r.bytes_read for r in ranks), seconds, nbytes / seconds / 1e9, ready_s,
                          sum(r.bytes_from_peers for r in ranks), whole)
        replicas = max(r.replica for r in ranks) + 1
        return cls(first.model, first.version, first.tp, first.store, list(ranks), verified, total, replicas,
                   list(phases))

    def replica(self, index: int) -> list[RankReport]:
        """One replica's rank reports, in rank order."""
        return [r for r in self.ranks if r.replica == index]

    def phase_line(self) -> str:
        """``manifest 0.01 s, connect 0.91 s, ...``: the phases for a one-line summary."""
        return ", ".join(f"{p.name} {p.seconds:.2f} s" for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (``raydist-loader load --report`` / ``--json``)."""
        return asdict(self)


def check_verified(model: str, reports: Sequence[RankReport], expected: Sequence[str] | None = None) -> None:
    """Raise :class:`VerificationError` unless every rank's chunks matched and its rank digest equals the one
    expected (``expected[rank]``, computed by the caller from the manifest; else the rank's own expected digest)."""
    failures = [f for r in reports for f in r.failures]
    wrong = [r.rank for r in reports if r.digest != (expected[r.rank] if expected else r.expected_digest)]
    if failures or wrong:
        detail = describe_failures(failures) if failures else f"ranks {wrong} have unexpected digests"
        who = f"rank {reports[0].rank} of model" if len(reports) == 1 else "model"
        raise VerificationError(f"{who} {model!r} failed verification after one re-pull: {detail}", failures)
