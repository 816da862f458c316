"""Layer 5 (entry points): One version per engine: every rank of a serving engine loads the version its first rank
resolved, and the engine serves (or applies an update) only when every rank says it loaded that version, verified.

Each rank of an engine is its own reader of the store; left alone, a publish landing between two ranks' reads gives
rank 0 the old version and rank 1 the new one, each verified. So (engine-neutral, over the engine's own CPU process
group: vLLM's and SGLang's world group, which spans TP, PP and vLLM's data-parallel ranks of one server):

1. :func:`agree_version`: rank 0 resolves the version (the pin, else the current pointer) and takes a lease on it
   for the engine (:mod:`raydist_loader.store.leases`: gc keeps it while the engine serves it); the group hands
   ``(version, manifest sha256)`` to every rank, which reads that version's own immutable manifest and checks its
   sha256. A rank 0 that cannot resolve makes every rank raise the same error.
2. :func:`on_every_rank`: each rank loads; the group gathers every rank's (version, verified, error); unless all
   loaded the agreed version, verified, every rank raises (naming each rank's outcome), so an engine never starts
   mixed and a failed update is refused on every rank before any weight is written (reloads pull and verify the
   whole shard first).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import RaydistError
from ..redact import redact_text
from ..report import RankReport
from ..store.leases import Lease
from ..store.versions import VersionRef
from .handoff import EngineOptions

_T = TypeVar("_T")


class RankGroup(Protocol):
    """An engine's CPU process group as the agreement needs it."""

    rank: int
    size: int

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""


@dataclass
class Solo:
    """A group of one (an engine of one rank)."""

    rank: int = 0
    size: int = 1

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


@dataclass
class TorchGroup:
    """A ``torch.distributed`` CPU (gloo) group: vLLM's and SGLang's ``GroupCoordinator.cpu_group``."""

    group: Any
    ranks: list[int]  # global ranks, in group order
    rank: int  # this process' index in ``ranks``

    @classmethod
    def of(cls, coordinator: Any) -> RankGroup:
        """The CPU group of an engine's ``GroupCoordinator`` (``cpu_group``, ``ranks``, ``rank_in_group``)."""
        if coordinator.world_size == 1:
            return Solo()
        return cls(coordinator.cpu_group, list(coordinator.ranks), int(coordinator.rank_in_group))

    @property
    def size(self) -> int:
        return len(self.ranks)

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[0], group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


# ------------------------------------------------------------------------------------------ leases
_lock = threading.Lock()
_serving: list[Lease] = []  # the lease on the version this process' engine serves (one engine per process)


def _lease_for(options: EngineOptions, version: str, holder: str) -> Lease | None:
    """A lease on ``version`` for this engine: the serving one when it is that version of that model already, else
    a new one (None when the store takes none: :meth:`Lease.try_take`)."""
    with _lock:
        serving = _serving[0] if _serving else None
    if serving is not None and (serving.model, serving.version) == (options.model, version):
        return serving
    return Lease.try_take(options.url, options.model, version, holder, connector_options=options.connector_options())


def _settle(lease: Lease | None, ok: bool) -> None:
    """After a load or update: on success the new lease becomes the serving one (the old one is released,
    whatever store or model it named); on failure the new one goes and the serving one stays."""
    if lease is None:
        return
    with _lock:
        old = _serving[0] if _serving else None
        if ok:
            _serving[:] = [lease]
    if ok and old is not None and old is not lease:
        old.release()
    if not ok and lease is not old:
        lease.release()


# ------------------------------------------------------------------------------------------ agreement
@dataclass(frozen=True)
class Agreed:
    """The version an engine agreed on, and (on rank 0) the lease taken on it."""

    ref: VersionRef
    lease: Lease | None = None


def _outcomes(group: RankGroup, mine: tuple) -> list[str]:
    """Every rank's ("ok", ...) or ("error", message) gathered: the failures as ``rank r: message``."""
    return [f"rank {r}: {o[1]}" for r, o in enumerate(group.gather(mine)) if o[0] == "error"]


def _failure(e: BaseException) -> tuple:
    return ("error", f"{type(e).__name__}: {redact_text(str(e))}")


def agree_version(group: RankGroup, holder: str, options: Callable[[], EngineOptions]) -> tuple[EngineOptions, Agreed]:
    """Every rank resolves its ``options()`` (the engine's options, a model directory's ``raydist.json``, and
    whatever else the caller checks first); only when every rank could, rank 0 resolves the version
    (``model_version``, else the current one) and leases it (a pinned version before it is looked up, so gc cannot
    take it meanwhile), and every rank gets the same :class:`VersionRef`. Any failure raises on every rank, naming
    each rank's error: no rank is left waiting in a collective."""
    from ..api import resolve_version  # imports Ray lazily: engines load without it

    try:
        opts, mine = options(), ("ok",)
    except BaseException as e:  # noqa: BLE001 - handed to every rank below, re-raised
        opts, mine, cause = None, _failure(e), e
    failed = _outcomes(group, mine)
    if failed:
        message = "no rank of this engine loads, as not every rank could read its options: " + "; ".join(failed)
        if mine[0] == "error":
            raise (type(cause) if isinstance(cause, RaydistError) else RaydistError)(message) from cause
        raise RaydistError(message)
    lease = None
    payload: tuple = ("pending",)
    if group.rank == 0:
        try:
            if opts.model_version is not None:
                lease = _lease_for(opts, opts.model_version, holder)
            ref = resolve_version(opts.url, opts.model, model_version=opts.model_version,
                                  connector_options=opts.connector_options())
            lease = lease or _lease_for(opts, ref.version, holder)
            payload = ("ok", ref.version, ref.manifest_sha256)
        except BaseException as e:  # noqa: BLE001 - handed to every rank below, re-raised
            _settle(lease, False)
            payload, cause = _failure(e), e
    payload = group.broadcast(payload)
    if payload[0] == "error":
        if group.rank == 0:
            raise cause
        raise RaydistError(f"rank 0 of this engine could not resolve the version of {opts.model!r} to load, so "
                           f"no rank loads: {payload[1]}")
    return opts, Agreed(VersionRef(payload[1], payload[2]), lease)


def on_every_rank(options: EngineOptions, group: RankGroup, agreed: Agreed, what: str,
                  work: Callable[[], tuple[_T, RankReport]]) -> _T:
    """``work()`` on this rank (it returns its result and the rank's report), then every rank's outcome
    gathered: every rank returns only when all loaded ``agreed`` verified (or unverified as the options say);
    otherwise every rank raises with each rank's outcome (``what`` names the operation: "load", "update")."""
    version = agreed.ref.version
    try:
        result, report = work()
        outcome: tuple = ("ok", report.version, bool(report.verify) and report.digest == report.expected_digest)
    except BaseException as e:  # noqa: BLE001 - reported to every rank, re-raised below
        result, cause, outcome = None, e, _failure(e)
    outcomes = group.gather(outcome)
    wrong = [f"rank {r}: {o[1]}" if o[0] == "error" else f"rank {r}: loaded version {o[1]}"
             for r, o in enumerate(outcomes) if o[0] == "error" or o[1] != version]
    unverified = [r for r, o in enumerate(outcomes) if o[0] == "ok" and not o[2]]
    if options.load.verify and unverified and not wrong:
        wrong = [f"rank {r}: not verified" for r in unverified]
    if group.rank == 0:
        _settle(agreed.lease, not wrong)
    if wrong:
        message = (f"{what} of {options.model!r} version {version} refused on every rank of this engine ("
                   f"{group.size}), so no rank serves a mix: " + "; ".join(wrong))
        if outcome[0] == "error":
            if not isinstance(cause, Exception):
                raise cause  # Ctrl-C, SystemExit: as they came (every rank was told first)
            kind = type(cause) if isinstance(cause, RaydistError) else RaydistError
            raise kind(message) from cause
        raise RaydistError(message)
    return result
