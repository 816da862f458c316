"""Layer 1 (connectors): Redis store: ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS); one raw value per
object.

Control operations (list, stat, delete) go through redis-py. The hot paths go through the small RESP2 client in
:mod:`._resp`: reads pipeline GETRANGE commands and receive each value straight into the caller's buffer
(redis-py returns a new ``bytes`` per value: an extra copy and an allocation as large as the value); writes
pipeline SETs sent straight from the caller's buffers (redis-py waits for each reply before the next SET). Each
thread keeps its own raw connection per server, so a thread pool reads or writes over several sockets at once.

The same URL naming any node of a Redis Cluster serves the whole cluster (:mod:`._cluster` keeps the slot map): a
batch is grouped by master, sent to every master before any reply is read (the masters work in parallel), and
what a node redirects (``MOVED``/``ASK``) goes again after the map is refreshed; a node that stops answering
invalidates the map and is retried until the retry deadline (its replica is promoted meanwhile). Control
operations run on each master's own redis-py client; ``list`` scans every master.
"""

from __future__ import annotations

import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import BackendError, ConfigError, NotFoundError, RaydistError
from ..pool import batches
from ..redact import redact_text
from ._cluster import Addr, SlotMap, Topology, addr_name, reconfiguring
from ._resp import Endpoint, RangeRead, RespConnection, RespError, SetWrite
from .base import Buffer, Connector, ReadRequest, check_key, joined, short_read

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
#: Reply bytes one pipeline flush may ask for; bounds the server's output buffer and our time between checks.
MAX_INFLIGHT_BYTES = 64 << 20

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_QUERY_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs")
_AUTH_CODES = frozenset({"WRONGPASS", "NOAUTH", "NOPERM"})
_BUSY_CODES = frozenset({"LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN"})
_CLUSTER_CODES = frozenset({"MOVED", "ASK", "CLUSTERDOWN", "CROSSSLOT"})
_GLOB_SPECIALS = frozenset("*?[]\\")
_REDIS_PY_CODES: tuple[tuple[type[Exception], str], ...] = (
    (rx.AuthenticationError, "WRONGPASS"),
    (rx.AuthenticationWrongNumberOfArgsError, "WRONGPASS"),
    (rx.NoPermissionError, "NOPERM"),
    (rx.BusyLoadingError, "LOADING"),
    (rx.AskError, "MOVED"),  # MovedError derives from AskError
    (rx.ClusterDownError, "CLUSTERDOWN"),
    (rx.ClusterCrossSlotError, "CROSSSLOT"),
    (rx.TryAgainError, "TRYAGAIN"),
)
#: What a reused socket raises when the server closed it meanwhile (restart, idle timeout): worth one retry.
_STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_REDIRECT_CODES = frozenset({"MOVED", "ASK"})
#: Rounds of redirects one batch may take (a map refresh after each) before it is an error.
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class RedisTarget:
    """Everything parsed from a Redis URL (plus keyword overrides). ``password`` never appears in ``repr``."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls: bool
    ssl_ca_certs: str | None
    ssl_cert_reqs: str

    @classmethod
    def from_url(
        cls, url: str, *, username: str | None, password: str | None, ssl_ca_certs: str | None
    ) -> RedisTarget:
        """Parse ``url``; keyword ``username``/``password``/``ssl_ca_certs`` override what the URL says."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - set(_QUERY_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown Redis URL option(s) {unknown}; known: {', '.join(_QUERY_OPTIONS)}")
        cert_reqs = query.get("ssl_cert_reqs", "required").lower()
        if cert_reqs not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {cert_reqs!r}")
        return cls(
            host=parts.hostname or "localhost",
            port=_port_of(url),
            db=_db_of(parts.path, url),
            username=username or (unquote(parts.username) if parts.username else None),
            password=password if password is not None else _unquote_or_none(parts.password),
            tls=parts.scheme.lower() == "rediss",
            ssl_ca_certs=ssl_ca_certs or query.get("ssl_ca_certs"),
            ssl_cert_reqs=cert_reqs,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``rediss://`` (None for plain ``redis://``)."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_ca_certs)
        if self.ssl_cert_reqs != "required":
            ctx.check_hostname = False
        ctx.verify_mode = _CERT_REQS[self.ssl_cert_reqs]
        return ctx

    def endpoint(self) -> Endpoint:
        """Connection settings for the raw RESP reader."""
        return Endpoint(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            ssl_context=self.ssl_context(),
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
        )

    def client(self) -> redis.Redis:
        """A redis-py client for control operations; one quick retry covers a stale pooled connection."""
        tls = {}
        if self.tls:
            tls = {
                "ssl": True,
                "ssl_ca_certs": self.ssl_ca_certs,
                "ssl_cert_reqs": self.ssl_cert_reqs,
                "ssl_check_hostname": self.ssl_cert_reqs == "required",
            }
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=READ_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
            **tls,
        )


def _port_of(url: str) -> int:
    try:
        return urlsplit(url).port or 6379
    except ValueError:
        raise ConfigError(f"bad port in Redis URL {redact_text(url)!r}: use redis://host:port/db") from None


def _db_of(path: str, url: str) -> int:
    db = path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(
            f"bad database {db!r} in Redis URL {redact_text(url)!r}: use redis://host:port/<number>"
        )
    return int(db)


def _unquote_or_none(value: str | None) -> str | None:
    return unquote(value) if value else None


def glob_escape(text: str) -> str:
    """Escape Redis glob specials so ``SCAN MATCH`` treats ``text`` literally."""
    return "".join("\\" + ch if ch in _GLOB_SPECIALS else ch for ch in text)


def _buf_bytes(req: ReadRequest) -> int:
    return len(req.buf)


def _value_bytes(write: SetWrite) -> int:
    return write.value.nbytes


def _error_code(exc: BaseException) -> str:
    """The Redis error code behind ``exc`` (``WRONGPASS``, ``MOVED``, ...) or "" for a transport error.

    redis-py strips the code from the messages of the errors it has a class for, so those map by class.
    """
    if isinstance(exc, RespError):
        return exc.code
    for cls, code in _REDIS_PY_CODES:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, rx.ResponseError):
        return str(exc).split(" ", 1)[0].upper()
    return ""


#: compare-and-swap of one key: ARGV[1] the sha1 of the value expected ('' = must not exist), ARGV[2] the new value
_SWAP_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if cur then return 0 end
elseif (not cur) or redis.sha1hex(cur) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


class _Pipeline(NamedTuple):
    """How one kind of pipelined command goes over a raw connection: send a batch, receive its replies, and the
    payload bytes of one item (for the traffic counters)."""

    send: Callable[[RespConnection, list], None]
    receive: Callable[[RespConnection, list], list]
    size: Callable[[Any], int]


_READS = _Pipeline(RespConnection.send_getrange, RespConnection.receive_getrange, lambda r: len(r.buf))
_WRITES = _Pipeline(
    RespConnection.send_set, lambda conn, writes: conn.receive_replies(len(writes)), lambda w: w.value.nbytes
)
T = TypeVar("T")


class RedisConnector(Connector):
    """A Redis database (or a Redis Cluster) as a store: each object is one string key holding raw bytes."""

    schemes = ("redis", "rediss")
    packs_files = False
    max_object_bytes = 64 << 20
    coalesce_gap = 1 << 20
    # Measured on 2 cores (16 MiB values): 2 threads ~= 1 > 4; redis-server itself is single-threaded.
    default_concurrency = 2
    max_request_bytes = 4 << 20  # measured: 4 MiB batches overlap reading with hashing (64 MiB: 0.6x)

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        username: str | None = None,
        ssl_ca_certs: str | None = None,
    ):
        super().__init__(url)
        self._target = RedisTarget.from_url(
            url, username=username, password=password, ssl_ca_certs=ssl_ca_certs
        )
        self._endpoint = self._target.endpoint()
        self._seed: Addr = (self._target.host, self._target.port)
        self._client = self._target.client()
        self._clients: dict[Addr, redis.Redis] = {self._seed: self._client}
        self._local = threading.local()
        self._lock = threading.RLock()  # RLock: a thread's end closes its connections under it (finalizer)
        self._conns: set[RespConnection] = set()
        self._topology = Topology(self._seed, self._open_node, self._target.tls)
        #: ``host:port`` -> [requests, payload bytes] sent over the raw connections (reads and SETs), per server.
        self.traffic: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- topology
    def _open_node(self, addr: Addr) -> RespConnection:
        """A raw connection to ``addr`` in database 0 (a cluster node, or the detection probe)."""
        return RespConnection(replace(self._endpoint, host=addr[0], port=addr[1], db=0))

    def _slot_map(self) -> SlotMap | None:
        """The cluster's slot map, or None for a standalone server (asked once, on first use)."""
        with self._errors("reading the cluster's slot map"):
            found = self._topology.current()
        if found is not None and self._target.db:
            raise ConfigError(
                f"{self.describe()} names database {self._target.db}, but it is a Redis Cluster node and a "
                "cluster has only database 0: use /0 in the URL"
            )
        return found

    def _route(self, keys: Sequence[str | bytes]) -> dict[Addr, list[int]]:
        """Positions of ``keys`` grouped by the server that holds them."""
        slot_map = self._slot_map()
        if slot_map is None:
            return {self._seed: list(range(len(keys)))}
        try:
            return slot_map.route(keys)
        except BackendError:  # a slot without a master: read the map again on the next try
            self._topology.invalidate()
            raise

    def _masters(self) -> tuple[Addr, ...]:
        slot_map = self._slot_map()
        return slot_map.masters if slot_map else (self._seed,)

    def masters(self) -> list[str]:
        """``host:port`` of every server holding data: the cluster's masters, or the one server."""
        return [addr_name(a) for a in self._masters()]

    def nodes_of(self, keys: Sequence[str]) -> dict[str, list[str]]:
        """``keys`` grouped by the server (``host:port``) that holds them."""
        return {addr_name(addr): [keys[i] for i in pos] for addr, pos in self._route(keys).items()}

    # ----------------------------------------------------------------- reads (hot path, raw RESP)
    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        self.readinto_many([ReadRequest(key, offset, buf)])

    def readinto_many(self, requests: Sequence[ReadRequest]) -> None:
        """Pipeline the reads over this thread's raw connections (one per server), at most ``MAX_INFLIGHT_BYTES``
        per flush."""
        for req in requests:
            check_key(req.key)
        for req in (r for r in requests if not len(r.buf)):
            self._require_exists(req.key)
        for batch in batches([r for r in requests if len(r.buf)], MAX_INFLIGHT_BYTES, _buf_bytes):
            reads = [RangeRead(r.key.encode(), r.offset, r.buf) for r in batch]
            results = self._exchange(reads, _READS, f"reading {batch[0].key!r}")
            for req, got in zip(batch, results, strict=True):
                self._check_reply(req, got)

    def _exchange(self, items: list, how: _Pipeline, action: str) -> list:
        """One reply per item, each item sent to the server that holds its key. Items a cluster node moved
        (``MOVED``) go again after the slot map is refreshed; an item of a slot being migrated (``ASK``) goes to the
        node named, after ``ASKING``, and its slot keeps its owner."""
        replies: list = [None] * len(items)
        todo = list(range(len(items)))
        for _ in range(MAX_REDIRECTS):
            groups = self._route([items[i].key for i in todo])
            got = self._on_nodes({addr: [todo[p] for p in pos] for addr, pos in groups.items()}, items, how, action)
            for i, (_addr, reply) in list(got.items()):
                if isinstance(reply, RespError) and reply.code == "ASK":
                    got[i] = self._ask(i, reply, items, how, action)
            redirected = []
            for i, (addr, reply) in got.items():
                code = reply.code if isinstance(reply, RespError) else ""
                if code in _REDIRECT_CODES:
                    redirected.append(i)
                elif code == "CLUSTERDOWN":
                    raise self._node_error(reply, addr, action)
                else:
                    replies[i] = reply
            if not redirected:
                return replies
            self._topology.invalidate()
            todo = redirected
        raise self._node_error(got[todo[0]][1], got[todo[0]][0], action)

    def _ask(self, i: int, ask: RespError, items: list, how: _Pipeline, action: str) -> tuple[Addr, Any]:
        """Item ``i`` on the node an ``ASK slot host:port`` reply names, preceded by ``ASKING`` (which admits one
        command for a slot that node is importing)."""
        host, _, port = str(ask).split()[-1].rpartition(":")
        asking = _Pipeline(lambda conn, sent: (conn.call(b"ASKING"), how.send(conn, sent)), how.receive, how.size)
        return self._on_nodes({(host, int(port)): [i]}, items, asking, action)[i]

    def _on_nodes(
        self, groups: dict[Addr, list[int]], items: list, how: _Pipeline, action: str
    ) -> dict[int, tuple[Addr, Any]]:
        """Send every server its items, then receive each server's replies (the servers work in parallel);
        ``{item: (server, reply)}``. A reused connection found dead (server restarted) is replaced once: reads and
        SETs are idempotent, so repeating the batch is safe."""
        for attempt in range(2):
            used: list[tuple[RespConnection, bool]] = []
            addr = self._seed
            try:
                for addr, pos in groups.items():
                    conn, reused = self._connection(addr)
                    used.append((conn, reused))
                    how.send(conn, [items[i] for i in pos])
                out: dict[int, tuple[Addr, Any]] = {}
                for (addr, pos), (conn, _) in zip(groups.items(), used, strict=True):
                    sent = [items[i] for i in pos]
                    out.update(zip(pos, ((addr, r) for r in how.receive(conn, sent)), strict=True))
                    self._count(addr, sent, how)
                return out
            except OSError as e:
                for conn, _ in used:
                    self._discard(conn)
                if attempt or not any(reused for _, reused in used) or not isinstance(e, _STALE_ERRORS):
                    raise self._node_error(e, addr, action) from None
        raise AssertionError("unreachable")

    def _count(self, addr: Addr, sent: list, how: _Pipeline) -> None:
        stats = self.traffic.setdefault(addr_name(addr), [0, 0])
        stats[0] += len(sent)
        stats[1] += sum(how.size(item) for item in sent)

    def _check_reply(self, req: ReadRequest, got: int | None | RespError) -> None:
        if isinstance(got, RespError):
            raise self._backend_error(got, f"reading {req.key!r}")
        if got is None:
            raise NotFoundError(f"{req.key!r} does not exist in {self.describe()}")
        if got < len(req.buf):
            self._require_exists(req.key)  # GETRANGE answers a missing key with an empty string
            raise short_read(req.key, req.offset, len(req.buf), got, self.describe())

    def _require_exists(self, key: str) -> None:
        if not self._on_key(key, lambda client: client.exists(key), f"checking {key!r}"):
            raise NotFoundError(f"{key!r} does not exist in {self.describe()}")

    def _thread_conns(self) -> dict[Addr, RespConnection]:
        """This thread's raw connections by server. They are closed when the thread ends: a load pulls each
        streamed group on a fresh thread pool, so connections kept to the connector's close would pile up, one per
        group, thread and server."""
        holder = getattr(self._local, "holder", None)
        if holder is None:
            holder = self._local.holder = _ThreadConns()
            weakref.finalize(holder, _close_thread_conns, holder.conns, self._conns, self._lock)
        return holder.conns

    def _connection(self, addr: Addr) -> tuple[RespConnection, bool]:
        """This thread's raw connection to ``addr`` (opened on first use) and whether it was used before."""
        conns = self._thread_conns()
        conn = conns.get(addr)
        if conn is not None:
            return conn, True
        conn = RespConnection(self._endpoint) if addr == self._seed else self._open_node(addr)
        with self._lock:
            self._conns.add(conn)
        conns[addr] = conn
        return conn, False

    def _discard(self, conn: RespConnection) -> None:
        conns = self._thread_conns()
        for addr in [a for a, c in conns.items() if c is conn]:
            del conns[addr]
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    # ----------------------------------------------------------------- writes (raw RESP)
    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        """One SET (atomic): readers see the old value or the whole new one."""
        self.write_many([(key, joined(data))])

    def write_many(self, items: Sequence[tuple[str, Buffer]]) -> None:
        """Pipelined SETs over this thread's raw connections (one per server), each value sent from its own
        buffer, at most ``MAX_INFLIGHT_BYTES`` per flush; each SET is atomic on its own."""
        writes = [SetWrite(check_key(key).encode(), memoryview(value).cast("B")) for key, value in items]
        for batch in batches(writes, MAX_INFLIGHT_BYTES, _value_bytes):
            replies = self._exchange(batch, _WRITES, f"writing {batch[0].key.decode()!r}")
            for write, reply in zip(batch, replies, strict=True):
                if isinstance(reply, RespError):
                    raise self._backend_error(reply, f"writing {write.key.decode()!r}")

    # ----------------------------------------------------------------- control (redis-py, one client per server)
    def _node_client(self, addr: Addr) -> redis.Redis:
        with self._lock:
            client = self._clients.get(addr)
            if client is None:
                client = self._clients[addr] = replace(self._target, host=addr[0], port=addr[1], db=0).client()
        return client

    def _redirected(self, fn: Callable[[], T]) -> T:
        """``fn()``, again after a slot map refresh when a cluster node redirected it."""
        for attempt in range(MAX_REDIRECTS):
            try:
                return fn()
            except BackendError as e:
                if not getattr(e, "redirect", False) or attempt == MAX_REDIRECTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _on_key(self, key: str, fn: Callable[[redis.Redis], T], action: str) -> T:
        """``fn(client)`` on the server that holds ``key``."""

        def once() -> T:
            (addr,) = self._route([key])
            with self._errors(action, addr):
                return fn(self._node_client(addr))

        return self._redirected(once)

    def read(self, key: str) -> bytes:
        """One GET: the value as one SET left it, even while a publish replaces it."""
        check_key(key)
        value = self._on_key(key, lambda client: client.get(key), f"reading {key!r}")
        if value is None:
            raise NotFoundError(f"{key!r} does not exist in {self.describe()}")
        return value

    def compare_and_swap(self, key: str, expected: bytes | None, data: Buffer) -> bool:
        """One server-side script (atomic): SET only if the value's sha1 is still ``expected``'s (or it is
        missing when ``expected`` is None)."""
        import hashlib  # local: this method stays self-contained

        want = "" if expected is None else hashlib.sha1(expected).hexdigest()
        check_key(key)  # on a cluster the script runs on the master that owns the key's slot
        return bool(self._on_key(key, lambda client: client.eval(_SWAP_SCRIPT, 1, key, want, bytes(data)),
                                 f"replacing {key!r}"))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix``: a SCAN of the server, or of every master of a cluster."""
        found: set[str] = set()
        for addr in self._masters():
            with self._errors(f"listing {prefix!r}", addr):
                scan = self._node_client(addr).scan_iter(glob_escape(prefix) + "*", 1000)
                found |= {k.decode("utf-8", "replace") for k in scan}
        yield from sorted(found)

    def stat(self, key: str) -> int | None:
        return self.stat_many([key])[0]

    def stat_many(self, keys: Sequence[str]) -> list[int | None]:
        """EXISTS + STRLEN of every key, pipelined (STRLEN alone cannot tell a missing key from an empty one)."""
        replies = self._pipelined(keys, lambda pipe, key: (pipe.exists(key), pipe.strlen(key)))
        return [int(size) if exists else None for exists, size in replies]

    def modified(self, keys: Sequence[str]) -> list[float | None]:
        """Now minus ``OBJECT IDLETIME`` (seconds since the key was last touched, read or write: never earlier than
        its last write). A server with an LFU policy does not track idle time: None (undated)."""
        now = time.time()
        replies = self._pipelined(keys, lambda pipe, key: pipe.object("idletime", key), raise_on_error=False)
        return [now - int(idle) if isinstance(idle, int) else None for (idle,) in replies]

    def _pipelined(self, keys: Sequence[str], queue, *, raise_on_error: bool = True) -> list[list]:
        """The replies of ``queue(pipe, key)`` per key, on the server that holds it, 1000 keys per round trip."""
        keys = [check_key(k) for k in keys]
        return self._redirected(lambda: self._pipelined_once(keys, queue, raise_on_error))

    def _pipelined_once(self, keys: list[str], queue, raise_on_error: bool) -> list[list]:
        per_key: list[list] = [[] for _ in keys]
        for addr, positions in self._route(keys).items():
            client = self._node_client(addr)
            for start in range(0, len(positions), 1000):
                batch = positions[start : start + 1000]
                more = f" and {len(batch) - 1} more keys" if len(batch) > 1 else ""
                with self._errors(f"checking {keys[batch[0]]!r}{more}", addr):
                    pipe = client.pipeline(transaction=False)
                    for i in batch:
                        queue(pipe, keys[i])
                    replies = pipe.execute(raise_on_error=raise_on_error)
                step = len(replies) // len(batch)
                for j, i in enumerate(batch):
                    per_key[i] = replies[j * step : (j + 1) * step]
        return per_key

    def delete(self, key: str) -> None:
        check_key(key)
        self._on_key(key, lambda client: client.unlink(key), f"deleting {key!r}")

    def check_eviction_policy(self) -> str | None:
        """A warning when a server (every master of a cluster) may evict keys (so a published model could lose
        chunks), else None. A server with CONFIG disabled, renamed or not permitted to this user cannot be
        checked: None."""
        warnings = []
        for addr in self._masters():
            with self._errors("reading the maxmemory settings", addr):
                try:
                    config = self._node_client(addr).config_get("maxmemory*")
                except rx.ResponseError:
                    continue
            policy = config.get("maxmemory-policy", "noeviction")
            maxmemory = int(config.get("maxmemory", 0) or 0)
            if policy != "noeviction" and maxmemory:
                where = self.describe() + (f" (node {addr_name(addr)})" if self._topology.known_cluster else "")
                warnings.append(f"Redis at {where} has maxmemory={maxmemory} and maxmemory-policy={policy}")
        if not warnings:
            return None
        return (
            "; ".join(warnings) + ": it may evict chunks of a published model, and loads would then fail; set "
            "maxmemory-policy to noeviction (CONFIG SET maxmemory-policy noeviction) or use a server without a "
            "memory limit"
        )

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
            clients = list(self._clients.values())
        for conn in conns:
            conn.close()
        self._local = threading.local()
        for client in clients:
            client.close()

    # ----------------------------------------------------------------- errors
    @contextmanager
    def _errors(self, action: str, addr: Addr | None = None) -> Iterator[None]:
        """Turn redis-py, RESP and socket failures into :class:`BackendError`; our own errors pass through."""
        try:
            yield
        except RaydistError:
            raise
        except (rx.RedisError, RespError, OSError) as e:
            raise self._node_error(e, addr, action) from None

    def _backend_error(self, exc: BaseException, action: str) -> BackendError:
        return self._node_error(exc, None, action)

    def _node_error(self, exc: BaseException, addr: Addr | None, action: str) -> BackendError:
        """A BackendError whose message says what failed where (the node, in a cluster), without any secret.

        In a cluster, a redirect or a node that fails transiently invalidates the slot map; a transient failure is
        then retried until the retry deadline (a master's replica is promoted meanwhile)."""
        cluster = self._topology.known_cluster
        where = self.describe() + (f" (cluster node {addr_name(addr)})" if cluster and addr else "")
        detail = redact_text(str(exc), (self._target.password or "",))
        user = self._target.username or "default"
        message, transient = failure_message(exc, action, where, user, detail)
        code = _error_code(exc)
        if cluster and transient or code in _REDIRECT_CODES:
            self._topology.invalidate()
        error = reconfiguring(message) if cluster and transient else BackendError(message, transient=transient)
        error.redirect = code in _REDIRECT_CODES  # type: ignore[attr-defined]
        return error


class _ThreadConns:
    """One thread's raw connections (held by the connector's thread-local: freed, and closed, when the thread ends)."""

    def __init__(self) -> None:
        self.conns: dict[Addr, RespConnection] = {}


def _close_thread_conns(conns: dict[Addr, RespConnection], alive: set, lock: threading.RLock) -> None:
    """Close an ended thread's connections and forget them (the connector's ``close`` no longer needs to)."""
    with lock:
        for conn in conns.values():
            alive.discard(conn)
    for conn in conns.values():
        conn.close()
    conns.clear()


def _cert_failure(exc: BaseException, detail: str) -> bool:
    """A TLS verification failure, also when redis-py wrapped it in its own ConnectionError."""
    chain = [exc, exc.__cause__, exc.__context__]
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in detail


def failure_message(exc: BaseException, action: str, where: str, user: str, detail: str) -> tuple[str, bool]:
    """What to tell the user about ``exc`` (already redacted as ``detail``), and whether a retry may help."""
    code = _error_code(exc)
    if code in _AUTH_CODES:
        return (
            f"authentication failed for user {user!r} at {where} ({detail}): check the username and "
            "password, and that the user's ACL allows this database's keys and commands"
        ), False
    if code == "CLUSTERDOWN":
        return (
            f"the Redis Cluster at {where} is down while {action} ({detail}): a master and its replicas are "
            "unreachable or a failover is still in progress; check `redis-cli cluster info` on that node"
        ), True
    if code in _REDIRECT_CODES:
        return (
            f"{where} keeps redirecting ({detail}) while {action}, although the slot map was read again: the "
            "cluster is being resharded (retry when it is done), or this user may not run CLUSTER SHARDS / "
            "CLUSTER SLOTS (grant +cluster|shards +cluster|slots)"
        ), True
    if code in _CLUSTER_CODES or "cluster mode" in detail.lower():
        return f"{where} is a Redis Cluster node and refused {action} ({detail}); a cluster has only database 0", False
    if code in _BUSY_CODES:
        return f"Redis at {where} is busy while {action} ({detail}); retry shortly", True
    if _cert_failure(exc, detail):
        return (
            f"TLS certificate verification failed for {where} ({detail}): pass ?ssl_ca_certs=/path/ca.pem "
            "(or ssl_ca_certs=) naming the CA that signed the server's certificate"
        ), False
    if code:
        return f"Redis at {where} refused {action}: {detail}", False
    return f"cannot reach Redis at {where} while {action}: {detail}", True
