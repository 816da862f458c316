"""Layer 1 (connectors): Redis Cluster topology: which master serves which key, learned from any one node.

A Redis Cluster spreads keys over 16384 hash slots, each owned by one master. :class:`Topology` asks the node named
in the store URL (later: any node it has seen) for ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` on Redis 6) and keeps the
slot map; a node that answers "cluster support disabled" is a standalone server (map ``None``). The connector routes
each key to its master with :meth:`SlotMap.route`, and calls :meth:`Topology.invalidate` when a node redirects it
(``MOVED``/``ASK``) or cannot be reached (a failover in progress): the next :meth:`Topology.current` fetches the map
again. It knows nothing about reads or writes; commands travel over the RESP connections ``connect`` opens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from redis.crc import key_slot

from ..errors import BackendError
from ._resp import Reply, RespConnection, RespError

SLOTS = 16384
Addr = tuple[str, int]
#: Replies of a node that cannot answer now (not a sign of a standalone server).
_BUSY = frozenset({"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN"})
_UNKNOWN = object()


def reconfiguring(message: str) -> BackendError:
    """A transient error that the retry loop retries until its deadline, whatever its attempt limit: a cluster
    that is promoting a replica comes back after its ``cluster-node-timeout`` plus an election."""
    error = BackendError(message, transient=True)
    error.until_deadline = True  # type: ignore[attr-defined]
    return error


def addr_name(addr: Addr) -> str:
    """``host:port``: how a node is named in messages and reports."""
    return f"{addr[0]}:{addr[1]}"


@dataclass(frozen=True)
class SlotMap:
    """Slot -> master, plus every node seen (the seeds of the next refresh)."""

    owners: tuple[Addr | None, ...]
    masters: tuple[Addr, ...]
    nodes: tuple[Addr, ...]

    def master_of(self, key: str | bytes) -> Addr:
        """The master that serves ``key``; a slot without one is a transient error (the cluster is reconfiguring)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        owner = self.owners[slot]
        if owner is None:
            raise reconfiguring(
                f"hash slot {slot} (key {key!r}) has no master in the Redis Cluster: the cluster is down or being "
                "reconfigured (a failover in progress); check `redis-cli cluster info` on any node"
            )
        return owner

    def route(self, keys: Iterable[str | bytes]) -> dict[Addr, list[int]]:
        """Positions of ``keys`` grouped by the master that serves them."""
        groups: dict[Addr, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.master_of(key), []).append(i)
        return groups


def _pairs(flat: Sequence[Reply]) -> dict[bytes, Reply]:
    """A RESP2 flat ``[name, value, name, value, ...]`` list as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}  # type: ignore[misc]


def _text(value: Reply) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_shards(reply: Reply, seed: Addr, tls: bool) -> SlotMap:
    """The map from ``CLUSTER SHARDS`` (Redis >= 7): per shard its slot ranges and nodes; the online master owns."""
    owners: list[Addr | None] = [None] * SLOTS
    masters: list[Addr] = []
    nodes: list[Addr] = []
    for shard in reply or []:
        fields = _pairs(shard)
        owner = None
        for node in fields.get(b"nodes") or []:
            info = _pairs(node)
            host = _text(info.get(b"endpoint") or b"")
            host = _text(info.get(b"ip") or b"") if host in ("", "?") else host
            port = info.get(b"tls-port") if tls and info.get(b"tls-port") else info.get(b"port")
            addr = (host or seed[0], int(port))  # type: ignore[arg-type]
            nodes.append(addr)
            if info.get(b"role") == b"master" and info.get(b"health") != b"fail":
                owner = addr
        ranges = [int(v) for v in fields.get(b"slots") or []]  # type: ignore[arg-type]
        if owner is not None and ranges:
            masters.append(owner)
            for start, end in zip(ranges[::2], ranges[1::2], strict=True):
                owners[start : end + 1] = [owner] * (end + 1 - start)
    return SlotMap(tuple(owners), tuple(dict.fromkeys(masters)), tuple(dict.fromkeys(nodes)))


def parse_slots(reply: Reply, seed: Addr) -> SlotMap:
    """The map from ``CLUSTER SLOTS`` (Redis 6): ``[start, end, [ip, port, id], replicas...]`` per range."""
    owners: list[Addr | None] = [None] * SLOTS
    masters: list[Addr] = []
    nodes: list[Addr] = []
    for start, end, *served in reply or []:  # type: ignore[misc]
        addrs = [(_text(n[0]) or seed[0], int(n[1])) for n in served]
        nodes += addrs
        if addrs:
            masters.append(addrs[0])
            owners[int(start) : int(end) + 1] = [addrs[0]] * (int(end) + 1 - int(start))
    return SlotMap(tuple(owners), tuple(dict.fromkeys(masters)), tuple(dict.fromkeys(nodes)))


def fetch_map(conn: RespConnection, seed: Addr, tls: bool) -> SlotMap | None:
    """The slot map as ``conn``'s node sees it, or None when that node is a standalone server.

    A node that refuses the CLUSTER command (cluster support disabled; an ACL without it; the command renamed
    away) is taken to be a standalone server: if it is a cluster node after all, its first ``MOVED`` comes back
    and the connector then names the missing permission. A node that is busy (``LOADING``...) raises: retry.
    """
    parsers = ((b"SHARDS", lambda r: parse_shards(r, seed, tls)), (b"SLOTS", lambda r: parse_slots(r, seed)))
    for command, parse in parsers:
        try:
            return parse(conn.call(b"CLUSTER", command))
        except RespError as e:
            if e.code in _BUSY:
                raise
            if command == b"SLOTS" or "unknown subcommand" not in str(e).lower():  # SHARDS is Redis >= 7
                return None
    return None


class Topology:
    """The current slot map of the server(s) behind one URL; thread-safe, fetched on first use and after
    :meth:`invalidate`. ``connect`` opens a RESP connection (database 0, no SELECT) to a node."""

    def __init__(self, seed: Addr, connect: Callable[[Addr], RespConnection], tls: bool):
        self.seed = seed
        self._connect = connect
        self._tls = tls
        self._lock = threading.Lock()
        self._map: SlotMap | None | object = _UNKNOWN
        self._stale = False

    def current(self) -> SlotMap | None:
        """The slot map (None: a standalone server), fetched again if it was invalidated."""
        with self._lock:
            if self._map is _UNKNOWN or self._stale:
                self._map = self._fetch()
                self._stale = False
            return self._map  # type: ignore[return-value]

    def invalidate(self) -> None:
        """Fetch the map again before the next use (a redirect, or a node that stopped answering)."""
        with self._lock:
            self._stale = True

    @property
    def known_cluster(self) -> bool:
        """Whether the last map fetched was a cluster's (no fetch)."""
        return isinstance(self._map, SlotMap)

    def _fetch(self) -> SlotMap | None:
        """Ask the seed, then every node seen before, until one answers."""
        known = self._map.nodes if isinstance(self._map, SlotMap) else ()
        last: OSError | None = None
        for addr in dict.fromkeys((self.seed, *known)):
            try:
                conn = self._connect(addr)
            except OSError as e:
                last = e
                continue
            try:
                found = fetch_map(conn, addr, self._tls)
            except OSError as e:
                last = e
                continue
            finally:
                conn.close()
            if isinstance(found, SlotMap) and not found.masters:
                raise BackendError(
                    f"the Redis Cluster node {addr_name(addr)} has no hash slots assigned: the cluster was never "
                    "created (redis-cli --cluster create ...) or lost every master"
                )
            return found
        assert last is not None
        raise last
