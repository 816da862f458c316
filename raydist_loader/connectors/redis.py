"""Layer 1 (connectors): Redis store: ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS); one raw value per
object.

Control operations (list, stat, delete) go through redis-py. The hot paths go through the small RESP2 client in
:mod:`._resp`: reads pipeline GETRANGE commands and receive each value straight into the caller's buffer
(redis-py returns a new ``bytes`` per value: an extra copy and an allocation as large as the value); writes
pipeline SETs sent straight from the caller's buffers (redis-py waits for each reply before the next SET). Each
thread keeps its own raw connection, so a thread pool reads or writes over several sockets at once.

Redis Cluster is not supported: a cluster node answers with ``MOVED``/``ASK`` and gets a clear error.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import BackendError, ConfigError, NotFoundError, RaydistError
from ..pool import batches
from ..redact import redact_text
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


class RedisConnector(Connector):
    """A Redis database as a store: each object is one string key holding raw bytes."""

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
        self._client = self._target.client()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[RespConnection] = set()

    # ----------------------------------------------------------------- reads (hot path, raw RESP)
    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        self.readinto_many([ReadRequest(key, offset, buf)])

    def readinto_many(self, requests: Sequence[ReadRequest]) -> None:
        """Pipeline the reads over this thread's raw connection, at most ``MAX_INFLIGHT_BYTES`` per flush."""
        for req in requests:
            check_key(req.key)
        for req in (r for r in requests if not len(r.buf)):
            self._require_exists(req.key)
        for batch in batches([r for r in requests if len(r.buf)], MAX_INFLIGHT_BYTES, _buf_bytes):
            results = self._pipeline([RangeRead(r.key.encode(), r.offset, r.buf) for r in batch])
            for req, got in zip(batch, results, strict=True):
                self._check_reply(req, got)

    def _pipeline(self, reads: list[RangeRead]) -> list[int | None | RespError]:
        """Run one pipelined batch of reads."""
        return self._on_connection(lambda conn: conn.getrange_into(reads), f"reading {reads[0].key.decode()!r}")

    def _on_connection(self, run: Callable[[RespConnection], list], action: str) -> list:
        """``run`` on this thread's raw connection; a reused connection found dead (server restarted) is replaced
        once (reads and SETs are idempotent, so repeating the batch is safe)."""
        with self._errors(action):
            for attempt in range(2):
                conn, reused = self._connection()
                try:
                    return run(conn)
                except OSError as e:
                    self._discard(conn)
                    if attempt or not reused or not isinstance(e, _STALE_ERRORS):
                        raise
        raise AssertionError("unreachable")

    def _check_reply(self, req: ReadRequest, got: int | None | RespError) -> None:
        if isinstance(got, RespError):
            raise self._backend_error(got, f"reading {req.key!r}")
        if got is None:
            raise NotFoundError(f"{req.key!r} does not exist in {self.describe()}")
        if got < len(req.buf):
            self._require_exists(req.key)  # GETRANGE answers a missing key with an empty string
            raise short_read(req.key, req.offset, len(req.buf), got, self.describe())

    def _require_exists(self, key: str) -> None:
        with self._errors(f"checking {key!r}"):
            found = self._client.exists(key)
        if not found:
            raise NotFoundError(f"{key!r} does not exist in {self.describe()}")

    def _connection(self) -> tuple[RespConnection, bool]:
        """This thread's raw connection (opened on first use) and whether it was used before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = RespConnection(self._endpoint)
        with self._lock:
            self._conns.add(conn)
        self._local.conn = conn
        return conn, False

    def _discard(self, conn: RespConnection) -> None:
        self._local.conn = None
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    # ----------------------------------------------------------------- writes (raw RESP)
    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        """One SET (atomic): readers see the old value or the whole new one."""
        self.write_many([(key, joined(data))])

    def write_many(self, items: Sequence[tuple[str, Buffer]]) -> None:
        """Pipelined SETs over this thread's raw connection, each value sent from its own buffer, at most
        ``MAX_INFLIGHT_BYTES`` per flush; each SET is atomic on its own."""
        writes = [SetWrite(check_key(key).encode(), memoryview(value).cast("B")) for key, value in items]
        for batch in batches(writes, MAX_INFLIGHT_BYTES, _value_bytes):
            replies = self._on_connection(lambda conn, b=batch: conn.set_many(b), f"writing {batch[0].key.decode()!r}")
            for write, reply in zip(batch, replies, strict=True):
                if isinstance(reply, RespError):
                    raise self._backend_error(reply, f"writing {write.key.decode()!r}")

    # ----------------------------------------------------------------- control (redis-py)
    def read(self, key: str) -> bytes:
        """One GET: the value as one SET left it, even while a publish replaces it."""
        check_key(key)
        with self._errors(f"reading {key!r}"):
            value = self._client.get(key)
        if value is None:
            raise NotFoundError(f"{key!r} does not exist in {self.describe()}")
        return value

    def compare_and_swap(self, key: str, expected: bytes | None, data: Buffer) -> bool:
        """One server-side script (atomic): SET only if the value's sha1 is still ``expected``'s (or it is
        missing when ``expected`` is None)."""
        import hashlib  # local: this method stays self-contained

        want = "" if expected is None else hashlib.sha1(expected).hexdigest()
        with self._errors(f"replacing {check_key(key)!r}"):
            return bool(self._client.eval(_SWAP_SCRIPT, 1, key, want, bytes(data)))

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._errors(f"listing {prefix!r}"):
            found = {
                k.decode("utf-8", "replace") for k in self._client.scan_iter(glob_escape(prefix) + "*", 1000)
            }
        yield from sorted(found)

    def stat(self, key: str) -> int | None:
        return self.stat_many([key])[0]

    def stat_many(self, keys: Sequence[str]) -> list[int | None]:
        """EXISTS + STRLEN of every key, pipelined (STRLEN alone cannot tell a missing key from an empty one)."""
        replies = self._pipelined(keys, lambda pipe, key: (pipe.exists(key), pipe.strlen(key)))
        return [int(size) if exists else None for exists, size in zip(replies[::2], replies[1::2], strict=True)]

    def modified(self, keys: Sequence[str]) -> list[float | None]:
        """Now minus ``OBJECT IDLETIME`` (seconds since the key was last touched, read or write: never earlier than
        its last write). A server with an LFU policy does not track idle time: None (undated)."""
        now = time.time()
        replies = self._pipelined(keys, lambda pipe, key: pipe.object("idletime", key), raise_on_error=False)
        return [now - int(idle) if isinstance(idle, int) else None for idle in replies]

    def _pipelined(self, keys: Sequence[str], queue, *, raise_on_error: bool = True) -> list:
        """Replies of ``queue(pipe, key)`` for every key, 1000 keys per round trip."""
        replies: list = []
        for start in range(0, len(keys), 1000):
            batch = [check_key(k) for k in keys[start : start + 1000]]
            more = f" and {len(batch) - 1} more keys" if len(batch) > 1 else ""
            with self._errors(f"checking {batch[0]!r}{more}"):
                pipe = self._client.pipeline(transaction=False)
                for key in batch:
                    queue(pipe, key)
                replies += pipe.execute(raise_on_error=raise_on_error)
        return replies

    def delete(self, key: str) -> None:
        check_key(key)
        with self._errors(f"deleting {key!r}"):
            self._client.unlink(key)

    def check_eviction_policy(self) -> str | None:
        """A warning when the server may evict keys (so a published model could lose chunks), else None.

        A server with CONFIG disabled, renamed or not permitted to this user cannot be checked: None.
        """
        with self._errors("reading the maxmemory settings"):
            try:
                config = self._client.config_get("maxmemory*")
            except rx.ResponseError:
                return None
        policy = config.get("maxmemory-policy", "noeviction")
        maxmemory = int(config.get("maxmemory", 0) or 0)
        if policy == "noeviction" or maxmemory == 0:
            return None
        return (
            f"Redis at {self.describe()} has maxmemory={maxmemory} and maxmemory-policy={policy}: it may "
            "evict chunks of a published model, and loads would then fail; set maxmemory-policy to "
            "noeviction (CONFIG SET maxmemory-policy noeviction) or use a server without a memory limit"
        )

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            conn.close()
        self._local = threading.local()
        self._client.close()

    # ----------------------------------------------------------------- errors
    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn redis-py, RESP and socket failures into :class:`BackendError`; our own errors pass through."""
        try:
            yield
        except RaydistError:
            raise
        except (rx.RedisError, RespError, OSError) as e:
            raise self._backend_error(e, action) from None

    def _backend_error(self, exc: BaseException, action: str) -> BackendError:
        """A BackendError whose message says what failed where, without any secret."""
        detail = redact_text(str(exc), (self._target.password or "",))
        user = self._target.username or "default"
        message, transient = failure_message(exc, action, self.describe(), user, detail)
        return BackendError(message, transient=transient)


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
    if code in _CLUSTER_CODES or "cluster mode" in detail.lower():
        return (
            f"{where} is a Redis Cluster node ({detail}); Redis Cluster is not supported yet: point the URL "
            "at a standalone Redis node"
        ), False
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
