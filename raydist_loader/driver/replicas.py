"""Layer 4 (driver): Replicas share one pull, the Ray side (imports coordinator, share): R TP groups placed over the
nodes, the store read once, the bytes moved between the replicas' same ranks through Ray's object store.

- Placement (:func:`start`): one placement group per replica (:class:`~raydist_loader.driver.coordinator.Coordinator`),
  each kept off the nodes of the replicas placed before it while another node has room for the whole group, so
  replicas spread over nodes when they fit; then every actor starts at once.
- The pull (:func:`load`): every actor runs :meth:`ReplicaActor.stripe`, a Ray generator that reads one part of its
  stripe from the store (verified, see :mod:`~raydist_loader.load.share`), ``ray.put``s it as a list of uint8 arrays
  (one object per part: the object manager moves it between nodes, readers on the same node map it zero-copy) and
  yields only the ObjectRef, nested in a list so that nobody resolves it on the way. The driver hands each ref to
  the same rank of the other replicas (:meth:`ReplicaActor.take`), which ``ray.get`` it, place and hash it. The
  driver never gets a part; once every peer has a part the driver drops its ref and tells the owner to drop its
  own (:meth:`ReplicaActor.drop`; :meth:`ReplicaActor.complete` drops any left), and the object is freed. An owner
  runs at most :data:`AHEAD` parts ahead of its peers (generator backpressure), which bounds the object store's
  use whatever the model's size.
- Trust: each rank's :meth:`~raydist_loader.load.share.ReplicaShard.complete` reads from the store what never arrived
  and re-pulls once what arrived wrong; the coordinator checks every replica's rank digests as for one replica.
- Faults: an actor that dies is restarted in its bundle (``max_restarts``) and loads its whole shard from the
  store alone; the chunks it had not shared yet are read from the store by its peers. Parts it owned die with it,
  so nothing stays pinned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import RaydistError
from ..load import share
from ..load.share import ReplicaShard
from ..options import LoadOptions
from ..report import RankReport, check_verified
from ..store.manifest import Manifest
from .coordinator import Coordinator

#: Parts an owner may have in flight (yielded but not yet taken by every peer), plus as many buffered in the
#: generator: the object store holds at most about 2 x AHEAD x PART_BYTES per actor.
AHEAD = 2


class ReplicaActor(ReplicaShard):
    """The actor class of a shared load: :class:`~raydist_loader.load.share.ReplicaShard` plus the calls that move
    parts through Ray's object store (and release them)."""

    def stripe(self):
        """Ray generator: for each part of this replica's stripe, read it from the store, put it in the object
        store and yield ``(part, [ref])``."""
        import ray

        for part in range(self.parts()):
            self.pull_part(part)
            t0 = time.perf_counter()
            ref = ray.put(self.export_part(part))
            self._spend("put_s", time.perf_counter() - t0)
            # the owner keeps its ref until the driver says every peer has the part (drop) or the load ends
            # (complete): a ref nested in a generator's item is not reliably borrowed yet when the generator moves
            # on or ends, and a part freed early is re-read from the store by every peer
            with self._share_lock:
                self._exported[part] = ref
            yield part, [ref]
            del ref

    def drop(self, part: int) -> None:
        """Every peer has part ``part`` (or gave up on it): release this owner's ref, the object store frees it."""
        with self._share_lock:
            self._exported.pop(part, None)

    def take(self, owner: int, part: int, wrapped: list) -> int | str:
        """Get part ``part`` of replica ``owner`` from the object store and place it. Returns the number of wrong
        chunks, or the reason the part could not be had (its owner died): :meth:`complete` reads from the store
        what never arrived."""
        import ray

        t0 = time.perf_counter()
        try:
            arrays = ray.get(wrapped[0])
        except Exception as e:  # noqa: BLE001 - owner died / object lost: the chunks come from the store instead
            return f"{type(e).__name__}"
        finally:
            self._spend("get_s", time.perf_counter() - t0)
        return self.take_part(owner, part, arrays)


def make_groups(
    manifest: Manifest,
    raw: bytes,
    url: str,
    tp: int,
    options: LoadOptions,
    connector_options: dict | None,
    *,
    progress: bool = False,
    hold: bool = False,
) -> list[Coordinator]:
    """One Coordinator per replica (a plain one when ``options.replicas`` is 1). ``hold``: the actors are named
    (:mod:`~raydist_loader.driver.held`: ``raydist:<model>:<rank>`` in replica 0, ``raydist:<model>#<i>:<rank>`` in
    replica i)."""
    count = options.replicas
    if count == 1:
        return [Coordinator(manifest, raw, url, tp, options, connector_options, progress=progress, hold=hold)]
    return [
        Coordinator(
            manifest, raw, url, tp, options, connector_options,
            progress=progress and i == 0,  # replica 0 shows the progress of every actor
            hold=hold,
            replica=i, actor_class=ReplicaActor,
            actor_kwargs={"replica": i, "replicas": count, "part_bytes": share.PART_BYTES},
        )
        for i in range(count)
    ]


def start_groups(groups: Sequence[Coordinator]) -> None:
    """Place every replica (spread over nodes while they fit), then start all actors at once and wait for them."""
    used: set[str] = set()
    for group in groups:
        group.place(avoid_nodes=used if _room_elsewhere(group, used) else ())
        used.update(group.nodes)
    started = [(group, group.spawn()) for group in groups]
    for group, refs in started:
        group._ready(refs)


def _room_elsewhere(group: Coordinator, used: set[str]) -> bool:
    """Whether a node without a replica yet has room for all of this group's bundles (PACK-style strategies
    only: SPREAD strategies spread the group itself)."""
    import ray

    if not used or group.options.placement not in ("pack", "strict_pack"):
        return False
    bundle = group.bundle()
    try:
        free = ray._private.state.available_resources_per_node()  # the public API has only the cluster's sum
    except Exception:  # noqa: BLE001 - without the per-node view, let Ray place it
        return False
    return any(
        node not in used and all(have.get(k, 0) >= v * group.tp for k, v in bundle.items())
        for node, have in free.items()
    )


def load_groups(groups: Sequence[Coordinator]) -> list[RankReport]:
    """Run the load (one group: the plain one; several: the shared pull on every replica's actors); returns the
    reports ordered by replica, then rank, verified against the digests the driver computed from the manifest."""
    first = groups[0]
    if len(groups) == 1:
        return first.load()
    stop = threading.Event()
    watcher = first._progress(stop, [a for group in groups for a in group.actors]) if first._show_progress else None
    try:
        reports = _Exchange(groups).run()
    finally:
        stop.set()
        if watcher:
            watcher.join()
    if first.options.verify:
        check_verified(first.manifest.model, reports, first.expected)
    return reports


def run_groups(groups: Sequence[Coordinator], fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(rank, tensors, *args)`` on every actor of every replica; results ordered by replica, then rank."""
    import ray

    return ray.get([a.run.remote(fn, *args) for group in groups for a in group.actors])


class _Exchange:
    """The driver's side of one shared pull: forwards part refs from owners to peers, restarts dead actors, then
    gathers every rank's report. Holds refs only; never gets a part."""

    def __init__(self, groups: Sequence[Coordinator]):
        self.groups = list(groups)
        self.tp = groups[0].tp
        self.options = groups[0].options
        self.restarts = [[0] * self.tp for _ in groups]
        self.reloads: dict[tuple[int, int], Any] = {}  # (replica, rank) restarted -> its full load
        self.streams: dict[Any, tuple[int, int]] = {}  # stripe generator -> (replica, rank)
        self.takes: dict[Any, tuple[tuple[int, int, int], int]] = {}  # take ref -> ((rank, owner, part), replica)
        self.parts: dict[tuple[int, int, int], tuple[list, set[int]]] = {}  # -> ([ref], peers still taking)

    def run(self) -> list[RankReport]:
        for i, group in enumerate(self.groups):
            for rank, actor in enumerate(group.actors):
                stream = actor.stripe.options(_generator_backpressure_num_objects=AHEAD).remote()
                self.streams[stream] = (i, rank)
        deadline = time.monotonic() + self.options.timeout_s
        while self.streams or self.takes:
            self._step(deadline)
        return self._reports()

    def _step(self, deadline: float) -> None:
        import ray

        waiting = [s for s, (i, r) in self.streams.items() if self._in_flight(i, r) < AHEAD]
        if not waiting and not self.takes:
            raise RaydistError("the shared load stalled: every stripe waits and no part is in flight")  # a bug
        ready, _ = ray.wait([*waiting, *self.takes], num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            if time.monotonic() >= deadline:
                raise RaydistError(f"the shared load did not finish within {self.options.timeout_s:.0f}s")
            return  # every stream is waiting for its peers; a take will finish
        for ref in ready:
            if ref in self.streams:
                self._forward(ref)
            else:
                self._took(ref)

    def _in_flight(self, owner: int, rank: int) -> int:
        """Parts of this owner that some peer is still taking."""
        return sum(1 for r, o, _ in self.parts if r == rank and o == owner)

    def _forward(self, stream) -> None:
        """The next part of a stripe is in the object store: hand its ref to the same rank of every other live
        replica."""
        import ray

        owner, rank = self.streams[stream]
        try:
            part, wrapped = ray.get(next(stream))
        except StopIteration:
            del self.streams[stream]
            return
        except Exception as e:  # noqa: BLE001 - the owner failed or died; its peers read the rest from the store
            del self.streams[stream]
            self._failed(owner, rank, e)
            return
        peers = {i for i in range(len(self.groups)) if i != owner and (i, rank) not in self.reloads}
        for i in peers:
            ref = self.groups[i].actors[rank].take.remote(owner, part, wrapped)
            self.takes[ref] = ((rank, owner, part), i)
        self.parts[(rank, owner, part)] = (wrapped, peers)
        self._settle((rank, owner, part))

    def _took(self, ref) -> None:
        import ray

        key, replica = self.takes.pop(ref)
        try:
            ray.get(ref)  # the number of wrong chunks, or why the part could not be had: complete() handles both
        except Exception as e:  # noqa: BLE001 - the receiver failed or died
            self._failed(replica, key[0], e)
        if key in self.parts:
            self.parts[key][1].discard(replica)
            self._settle(key)

    def _settle(self, key: tuple[int, int, int]) -> None:
        """Drop the driver's ref to a part every peer has, and tell its owner to drop its own (the object store
        frees it then)."""
        if key in self.parts and not self.parts[key][1]:
            del self.parts[key]
            rank, owner, part = key
            if (owner, rank) not in self.reloads:  # a restarted owner holds no part of the old one
                self.groups[owner].actors[rank].drop.remote(part)

    def _failed(self, replica: int, rank: int, error: BaseException) -> None:
        """An actor of the exchange failed: a dead one is restarted (it then loads its shard alone), any other
        failure is one error naming replica and rank."""
        from ray.exceptions import RayActorError

        group = self.groups[replica]
        if (replica, rank) in self.reloads:
            return  # already restarted: its old calls fail one by one
        if not isinstance(error, RayActorError):
            raise RaydistError(f"{group._who(rank)}failed: {group._clean(error)}") from None
        self.restarts[replica][rank] += 1
        self.reloads[(replica, rank)] = group.restart_after(rank, error, self.restarts[replica][rank])
        for key in [k for k in self.parts if k[0] == rank]:  # its pending takes no longer hold parts back
            self.parts[key][1].discard(replica)
            self._settle(key)

    def _reports(self) -> list[RankReport]:
        """Every rank completes (what never arrived from the store, what arrived wrong re-pulled once); the
        restarted ones report their own full load. A death now restarts once more, within ``max_restarts``."""
        reports = []
        for i, group in enumerate(self.groups):
            refs = [self.reloads.get((i, r)) or actor.complete.remote() for r, actor in enumerate(group.actors)]
            reports += group._gather(refs, self.restarts[i])
        return reports
