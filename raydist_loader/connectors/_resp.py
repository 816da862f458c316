"""Layer 1 (connectors): A minimal RESP2 client for the Redis hot paths: pipelined GETRANGE with replies received into
caller buffers (load), and pipelined SET sent straight from caller buffers (publish).

redis-py returns every value as a new ``bytes`` object: a copy, and an allocation as large as the value,
per read; and it waits for each SET's reply before the next. This client sends a batch of GETRANGE commands in
one write, then ``recv_into``s each bulk reply straight into the memoryview the caller supplied, so payload bytes
are written once; and it sends a batch of SETs back to back, each value from the caller's buffer (small frames
coalesced, large values handed to ``sendall`` as they are), then reads the replies. It speaks only what the
loader needs: AUTH (ACL user or legacy password), SELECT, TLS, and simple/integer/bulk/array/error replies.

It knows nothing about URLs or the loader's errors: socket failures surface as ``OSError``
(``ConnectionError``, ``TimeoutError``, ``ssl.SSLError``), a server's error reply as :class:`RespError`; the
connector maps both.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

_CRLF = b"\r\n"
#: Size of the internal buffer that holds reply headers and small values; large payloads bypass it.
_HEADER_BUFFER_BYTES = 64 << 10
#: Outgoing frames smaller than this are coalesced into one send; larger values go to the socket as they are.
_COALESCE_BYTES = 64 << 10

Reply = bytes | int | list["Reply"] | None


class RespError(Exception):
    """An error reply (``-CODE message``); ``code`` is its first word (``WRONGPASS``, ``MOVED``, ...)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = message.split(" ", 1)[0].upper()


class RespProtocolError(ConnectionError):
    """The server sent something unexpected; the connection is out of step and must be closed."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect. ``password`` is kept out of ``repr`` so it never reaches a log."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass(frozen=True)
class RangeRead:
    """Receive ``len(buf)`` bytes of ``key`` from ``offset`` into ``buf``."""

    key: bytes
    offset: int
    buf: memoryview


@dataclass(frozen=True)
class SetWrite:
    """Store ``value`` (a C-contiguous byte buffer, sent as it is: no copy) as ``key``."""

    key: bytes
    value: memoryview


def pack_command(*args: bytes | str | int) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(parts)


def set_frames(writes: Sequence[SetWrite]) -> Iterator[bytes | memoryview]:
    """The wire frames of one ``SET key value`` per write: a small header, the value's own buffer, CRLF."""
    for w in writes:
        yield b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(w.key), w.key, w.value.nbytes)
        yield w.value
        yield _CRLF


class RespConnection:
    """One socket to one server. Not thread-safe: give each thread its own."""

    def __init__(self, endpoint: Endpoint):
        self._sock = _open_socket(endpoint)
        self._buf = bytearray(_HEADER_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0  # first unconsumed byte in _buf
        self._end = 0  # one past the last received byte in _buf
        try:
            self._handshake(endpoint)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- public
    def call(self, *args: bytes | str | int) -> Reply:
        """Send one command and return its reply; an error reply raises :class:`RespError`."""
        self._sock.sendall(pack_command(*args))
        reply = self._read_reply()
        if isinstance(reply, RespError):
            raise reply
        return reply

    def getrange_into(self, reads: Sequence[RangeRead]) -> list[int | None | RespError]:
        """Pipeline one GETRANGE per read and receive each reply into its buffer.

        Returns, per read, the number of bytes received (fewer than asked when the value is short or missing:
        Redis answers GETRANGE on a missing key with an empty string), None for a nil reply, or the server's
        error reply. Every reply is consumed even after an error reply, so the connection stays usable.
        """
        self.send_getrange(reads)
        return self.receive_getrange(reads)

    def send_getrange(self, reads: Sequence[RangeRead]) -> None:
        """The sending half of :meth:`getrange_into` (a caller with several servers sends to all, then receives)."""
        commands = [pack_command(b"GETRANGE", r.key, r.offset, r.offset + len(r.buf) - 1) for r in reads]
        self._sock.sendall(b"".join(commands))

    def receive_getrange(self, reads: Sequence[RangeRead]) -> list[int | None | RespError]:
        """The receiving half of :meth:`getrange_into`."""
        return [self._read_bulk_into(r.buf) for r in reads]

    def set_many(self, writes: Sequence[SetWrite]) -> list[Reply | RespError]:
        """Pipeline one SET per write, each value sent from its own buffer, then read every reply (``b"OK"``, or
        the server's error reply: all are consumed, so the connection stays usable)."""
        self.send_set(writes)
        return self.receive_replies(len(writes))

    def send_set(self, writes: Sequence[SetWrite]) -> None:
        """The sending half of :meth:`set_many`."""
        self._send(set_frames(writes))

    def receive_replies(self, count: int) -> list[Reply | RespError]:
        """The next ``count`` replies, error replies returned (not raised)."""
        return [self._read_reply() for _ in range(count)]

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def _send(self, frames: Iterable[bytes | memoryview]) -> None:
        """Send frames in order: small ones gathered into one buffer, large ones straight from their memory."""
        pending = bytearray()
        for frame in frames:
            if len(frame) < _COALESCE_BYTES:
                pending += frame
                if len(pending) < _COALESCE_BYTES:
                    continue
                frame = b""
            if pending:
                self._sock.sendall(pending)
                pending = bytearray()
            if len(frame):
                self._sock.sendall(frame)
        if pending:
            self._sock.sendall(pending)

    # ----------------------------------------------------------------- handshake
    def _handshake(self, endpoint: Endpoint) -> None:
        if endpoint.password is not None:
            user = [endpoint.username] if endpoint.username else []
            self.call(b"AUTH", *user, endpoint.password)
        if endpoint.db:
            self.call(b"SELECT", endpoint.db)

    # ----------------------------------------------------------------- reply parsing
    def _read_bulk_into(self, dest: memoryview) -> int | None | RespError:
        line = self._read_line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind != b"$":
            raise RespProtocolError(f"expected a bulk reply to GETRANGE, got {line[:40]!r}")
        size = int(rest)
        if size < 0:
            return None
        if size > len(dest):
            raise RespProtocolError(
                f"GETRANGE reply of {size} bytes is longer than the {len(dest)} asked for"
            )
        self._receive_into(dest[:size])
        self._expect_crlf()
        return size

    def _read_reply(self) -> Reply | RespError:
        line = self._read_line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return self._read_bulk(int(rest))
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read_reply() for _ in range(count)]
        raise RespProtocolError(f"unexpected reply {line[:40]!r}")

    def _read_bulk(self, size: int) -> bytes | None:
        if size < 0:
            return None
        out = bytearray(size)
        self._receive_into(memoryview(out))
        self._expect_crlf()
        return bytes(out)

    def _expect_crlf(self) -> None:
        end = bytearray(2)
        self._receive_into(memoryview(end))
        if end != _CRLF:
            raise RespProtocolError(f"bulk reply not terminated by CRLF (got {bytes(end)!r})")

    def _read_line(self) -> bytes:
        while True:
            idx = self._buf.find(_CRLF, self._start, self._end)
            if idx >= 0:
                line = bytes(self._view[self._start : idx])
                self._start = idx + 2
                return line
            self._fill()

    def _receive_into(self, dest: memoryview) -> None:
        """Fill ``dest`` exactly: first from bytes already buffered, then straight from the socket."""
        want = len(dest)
        take = min(want, self._end - self._start)
        if take:
            dest[:take] = self._view[self._start : self._start + take]
            self._start += take
        done = take
        while done < want:
            got = self._sock.recv_into(dest[done:])
            if not got:
                raise ConnectionResetError("the server closed the connection mid-reply")
            done += got

    def _fill(self) -> None:
        """Receive more bytes into the internal buffer (compacting it first)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                raise RespProtocolError(f"reply line longer than {len(self._buf)} bytes")
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        got = self._sock.recv_into(self._view[self._end :])
        if not got:
            raise ConnectionResetError("the server closed the connection")
        self._end += got


def _open_socket(endpoint: Endpoint) -> socket.socket:
    """Connect (bounded by ``connect_timeout``), wrap in TLS if asked, then set the read timeout."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=endpoint.connect_timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if endpoint.ssl_context is not None:
            sock = endpoint.ssl_context.wrap_socket(sock, server_hostname=endpoint.host)
        sock.settimeout(endpoint.read_timeout)
    except BaseException:
        sock.close()
        raise
    return sock
