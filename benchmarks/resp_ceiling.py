"""The Redis ceiling: a minimal RESP2 reader that pipelines GETs and receives each value into a preallocated buffer.

No per-value ``bytes``: replies go from the socket straight into the caller's memoryview (``BufferedReader.readinto``
of a value larger than its 64 KiB buffer calls ``socket.recv_into`` on the destination). Replies in flight per
connection are capped (like a careful client would), and a new GET is sent as soon as a reply is consumed.
"""

from __future__ import annotations

import socket
import threading
from collections import deque

WINDOW_BYTES = 64 << 20  # reply bytes asked for but not yet received, per connection


def _get_cmd(key: bytes) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key)


def read_values(port: int, items: list[tuple[bytes, memoryview]], host: str = "127.0.0.1") -> None:
    """GET every key into its buffer over one connection (pipelined, at most WINDOW_BYTES in flight)."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb", buffering=64 << 10)
    pending: deque[memoryview] = deque()
    inflight, nxt = 0, 0
    try:
        while nxt < len(items) or pending:
            batch = []
            while nxt < len(items) and (not pending or inflight + len(items[nxt][1]) <= WINDOW_BYTES):
                key, buf = items[nxt]
                batch.append(_get_cmd(key))
                pending.append(buf)
                inflight += len(buf)
                nxt += 1
            if batch:
                sock.sendall(b"".join(batch))
            buf = pending.popleft()
            header = reader.readline()
            if header[:1] != b"$" or int(header[1:]) != len(buf):
                raise RuntimeError(f"unexpected reply {header[:40]!r} for a {len(buf)}-byte value")
            got = reader.readinto(buf)
            if got != len(buf) or reader.read(2) != b"\r\n":
                raise RuntimeError("short or unterminated reply")
            inflight -= len(buf)
    finally:
        reader.close()
        sock.close()


def read_all(port: int, items: list[tuple[bytes, memoryview]], connections: int = 2) -> None:
    """Spread the keys over ``connections`` sockets (balanced by bytes) and read them in parallel threads."""
    lanes: list[list[tuple[bytes, memoryview]]] = [[] for _ in range(connections)]
    sizes = [0] * connections
    for item in items:
        i = sizes.index(min(sizes))
        lanes[i].append(item)
        sizes[i] += len(item[1])
    errors: list[BaseException] = []

    def run(lane: list[tuple[bytes, memoryview]]) -> None:
        try:
            read_values(port, lane)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(lane,)) for lane in lanes if lane]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
