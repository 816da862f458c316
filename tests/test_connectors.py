"""The connector contract, run against every backend on real servers (file, redis-server, moto's S3 server).

Backend-specific behaviour (Redis auth/outage/cluster/eviction, S3 pagination/multipart/errors) and the scheme
registry are tested below the contract suite.
"""

from __future__ import annotations

import http.server
import importlib
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from raydist_loader import connectors
from raydist_loader.connectors import Connector, ReadRequest, open_connector, register_connector
from raydist_loader.connectors.file import FileConnector
from raydist_loader.errors import BackendError, ConfigError, MissingDependencyError, NotFoundError

MiB = 1 << 20
TENSOR_KEY = "m/v1/model.layers.0.self_attn.q_proj.weight::q.0"


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


@pytest.fixture
def conn(store_url: str) -> Iterator[Connector]:
    with open_connector(store_url) as c:
        yield c


# --------------------------------------------------------------------------------------------- contract suite
def test_round_trip_bytes(conn: Connector) -> None:
    data = pattern(100_000)
    conn.write("m/v1/blob", data)
    assert conn.read("m/v1/blob") == data
    assert conn.stat("m/v1/blob") == len(data)
    assert conn.exists("m/v1/blob")


def test_round_trip_empty_and_overwrite(conn: Connector) -> None:
    conn.write("m/empty", b"")
    assert conn.stat("m/empty") == 0
    assert conn.read("m/empty") == b""
    conn.write("m/empty", b"now full")
    assert conn.read("m/empty") == b"now full"


@pytest.fixture
def small_multipart(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 objects above one 5 MiB part (S3's smallest) go up as multipart uploads: small tests reach that path."""
    from raydist_loader.connectors import s3

    monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * MiB)


def test_round_trip_blocks_multipart(conn: Connector, small_multipart: None) -> None:
    """An iterable of uneven blocks, 4 parts on S3 (uploaded concurrently: they must land in order)."""
    data = pattern(19 * MiB + 12345, seed=1)
    cuts = [0, 1, 3 * MiB, 3 * MiB + 7, 8 * MiB, 8 * MiB + 1, len(data)]
    conn.write("m/v1/big.safetensors", (data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)))
    assert conn.stat("m/v1/big.safetensors") == len(data)
    assert conn.read("m/v1/big.safetensors") == data


def test_write_from_a_producer_that_reuses_its_buffer(conn: Connector) -> None:
    """``write`` takes an iterable of blocks; a producer that reads into one buffer and yields it again and again
    (streaming a file) must get its bytes stored, not the last block's bytes repeated."""
    data = pattern(1 * MiB + 123, seed=7)
    buf = bytearray(64 << 10)

    def blocks():
        for start in range(0, len(data), len(buf)):
            n = min(len(buf), len(data) - start)
            buf[:n] = data[start : start + n]
            yield memoryview(buf)[:n]

    conn.write("m/v1/streamed", blocks())
    assert conn.read("m/v1/streamed") == data
    arrays = [np.frombuffer(data[a : a + 4096], dtype=np.uint8) for a in range(0, len(data), 4096)]
    conn.write("m/v1/arrays", iter(arrays))  # numpy blocks (publish streams them)
    assert conn.read("m/v1/arrays") == data


def test_write_accepts_bytearray_and_memoryview(conn: Connector) -> None:
    conn.write("a", bytearray(b"abc"))
    conn.write("b", memoryview(b"xyz123")[1:4])
    assert conn.read("a") == b"abc"
    assert conn.read("b") == b"yz1"


@pytest.mark.parametrize("target", ["bytearray", "numpy", "torch"])
def test_readinto_at_offset_into_a_slice(conn: Connector, target: str) -> None:
    data = pattern(4096, seed=2)
    conn.write(TENSOR_KEY, data)
    if target == "bytearray":
        backing = bytearray(1000)
        view = memoryview(backing)
    elif target == "numpy":
        backing = np.zeros(1000, dtype=np.uint8)
        view = memoryview(backing)
    else:
        backing = torch.zeros(1000, dtype=torch.uint8)
        view = memoryview(backing.numpy())
    conn.readinto(TENSOR_KEY, 1234, view[100:600])
    got = bytes(memoryview(backing.numpy() if target == "torch" else backing))
    assert got[100:600] == data[1234:1734]
    assert got[:100] == bytes(100) and got[600:] == bytes(400), "bytes outside the slice were touched"


def _reads_while_replaced(conn: Connector, key: str = "m/manifest.json") -> set[bytes]:
    """Read ``key`` over and over while another thread keeps replacing it with values of other sizes."""
    versions = [bytes([65 + i]) * (3000 + 1700 * i) for i in range(3)]
    conn.write(key, versions[0])
    stop, seen = threading.Event(), set()

    def publisher() -> None:
        with open_connector(conn.url) as writer:
            i = 0
            while not stop.is_set():
                i += 1
                writer.write(key, versions[i % len(versions)])

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen.add(conn.read(key))
    finally:
        stop.set()
        thread.join(10)
    torn = seen - set(versions)
    assert not torn, f"read returned {len(torn)} values that no write stored (a torn read): {sorted(torn)[0][:40]!r}..."
    return seen


def test_read_of_an_object_being_replaced_is_one_whole_version(conn: Connector) -> None:
    """The manifest swap: a loader reading ``manifest.json`` while a publish replaces it gets the old bytes or the
    new ones, never the start of one and the end of the other (that parsed as broken JSON mid-publish)."""
    assert len(_reads_while_replaced(conn)) >= 2, "the writer never got a replacement in: the test saw no swap"


class _RangedOnly(Connector):
    """A plug-in with only the five primitives, over a dict, serving a read in 512-byte ranges; ``replace_during``
    swaps a value in between two ranges of the next read (a publish landing mid-read)."""

    schemes = ("rangedonly",)

    def __init__(self, url: str):
        super().__init__(url)
        self.store: dict[str, bytes] = {}
        self.replace_during: tuple[str, bytes] | None = None

    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        for start in range(0, len(buf), 512):
            if start and self.replace_during:
                k, v = self.replace_during
                self.store[k], self.replace_during = v, None
            if key not in self.store:
                raise NotFoundError(key)
            piece = self.store[key][offset + start : offset + min(start + 512, len(buf))]
            buf[start : start + len(piece)] = piece

    def write(self, key: str, data) -> None:
        self.store[key] = bytes(data)

    def list(self, prefix: str = ""):
        return iter(sorted(k for k in self.store if k.startswith(prefix)))

    def stat(self, key: str) -> int | None:
        return len(self.store[key]) if key in self.store else None

    def delete(self, key: str) -> None:
        self.store.pop(key, None)


@pytest.mark.parametrize("new_size", [1000, 5000, 3000], ids=["shrinks", "grows", "same-size"])
def test_plugin_read_without_an_atomic_get_rereads_an_object_replaced_mid_read(new_size: int) -> None:
    """A plug-in backend gets the base class's ``read``: an object replaced between two of its range reads is read
    again, whole, never returned as the start of one version and the end of another (or as a short-read error),
    even when the new version has the old one's size (a re-published manifest often has)."""
    conn = _RangedOnly("rangedonly://x")
    conn.write("m/manifest.json", b"A" * 3000)
    conn.replace_during = ("m/manifest.json", b"B" * new_size)
    assert conn.read("m/manifest.json") == b"B" * new_size
    assert conn.replace_during is None, "the replacement never landed mid-read: the test proved nothing"


def test_short_read_is_an_error(conn: Connector) -> None:
    conn.write("m/v1/short", pattern(1000))
    with pytest.raises(BackendError, match="truncated"):
        conn.readinto("m/v1/short", 900, memoryview(bytearray(200)))
    with pytest.raises(BackendError, match="truncated"):
        conn.readinto("m/v1/short", 5000, memoryview(bytearray(10)))


def test_missing_key(conn: Connector) -> None:
    with pytest.raises(NotFoundError, match="m/v1/nope"):
        conn.readinto("m/v1/nope", 0, memoryview(bytearray(10)))
    with pytest.raises(NotFoundError, match="m/v1/nope"):
        conn.read("m/v1/nope")
    with pytest.raises(NotFoundError, match="m/v1/nope"):
        conn.readinto_many([ReadRequest("m/v1/nope", 0, memoryview(bytearray(3)))])
    assert conn.stat("m/v1/nope") is None
    assert not conn.exists("m/v1/nope")


def test_stat_exists_delete_and_delete_prefix(conn: Connector) -> None:
    for key in ("m/v1/a", "m/v1/b", "m/v2/a", "m2/a"):
        conn.write(key, key.encode())
    conn.delete("m/v1/a")
    conn.delete("m/v1/a")  # deleting a missing key is not an error
    assert not conn.exists("m/v1/a") and conn.exists("m/v1/b")
    assert conn.delete_prefix("m/") == 2
    assert list(conn.list("")) == ["m2/a"]
    with pytest.raises(ValueError):
        conn.delete_prefix("")


def test_stat_many_and_modified(conn: Connector) -> None:
    """The one-pass size check publish runs before its swap, and the write times gc dates versions by."""
    before = time.time()
    conn.write("m/v1/a", b"abc")
    conn.write("m/v1/empty", b"")
    assert conn.stat_many(["m/v1/a", "m/v1/none", "m/v1/empty"]) == [3, None, 0]
    written, missing = conn.modified(["m/v1/a", "m/v1/none"])
    assert missing is None and before - 1 <= written <= time.time() + 1


def test_list_with_prefix(conn: Connector) -> None:
    keys = [
        TENSOR_KEY,
        "m/v1/model.layers.0.self_attn.q_proj.weight::k.0",
        "m/v1/model.layers.10.mlp.down_proj.weight::all.1",
        "m/v1/glob[0]*?.weight",
        "m/manifest.json",
        "m2/manifest.json",
    ]
    for key in keys:
        conn.write(key, b"x")
    assert list(conn.list("m/")) == sorted(k for k in keys if k.startswith("m/"))
    assert list(conn.list("m/v1/model.layers.0.")) == sorted(keys[:2])
    assert list(conn.list("m/v1/glob[0]")) == ["m/v1/glob[0]*?.weight"]
    assert list(conn.list("nothing/")) == []
    assert list(conn.list()) == sorted(keys)


def test_readinto_many_equals_individual_reads(conn: Connector) -> None:
    rng = random.Random(3)
    values = {f"m/v1/t{i}::all.0": pattern(rng.randrange(1, 300_000), seed=i) for i in range(8)}
    for key, value in values.items():
        conn.write(key, value)
    specs = []
    for _ in range(50):
        key = rng.choice(sorted(values))
        size = len(values[key])
        offset = 0 if rng.random() < 0.3 else rng.randrange(size)
        length = size - offset if rng.random() < 0.3 else rng.randrange(0, size - offset + 1)
        specs.append((key, offset, length))
    batch = [ReadRequest(k, o, memoryview(bytearray(n))) for k, o, n in specs]
    conn.readinto_many(batch)
    for req, (key, offset, length) in zip(batch, specs, strict=True):
        single = bytearray(length)
        conn.readinto(key, offset, memoryview(single))
        assert bytes(req.buf) == bytes(single) == values[key][offset : offset + length]


def test_adjacent_ranges_are_served_as_one_request(conn: Connector, monkeypatch) -> None:
    """Back-to-back ranges of one object (adjacent chunks of a rank slot file) land exactly where asked."""
    value = pattern(1_000_003, seed=9)
    conn.write("m/v1/rank000.safetensors", value)
    cuts = [0, 1, 4096, 4097, 300_000, 999_000, 1_000_003]
    bufs = [bytearray(b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    reqs = [ReadRequest("m/v1/rank000.safetensors", a, memoryview(buf)) for a, buf in zip(cuts, bufs, strict=False)]
    calls = []
    if type(conn).readv is not Connector.readv:  # backends with a vectored read make one request per run
        original = type(conn).readv
        monkeypatch.setattr(type(conn), "readv", lambda self, *a: calls.append(a[0]) or original(self, *a))
    conn.readinto_many(reqs)
    assert b"".join(bufs) == value
    assert calls in ([], ["m/v1/rank000.safetensors"])


def test_coalesce_joins_only_adjacent_ranges_of_one_object() -> None:
    from raydist_loader.connectors.base import coalesce

    buf = memoryview(bytearray(10))
    runs = coalesce([ReadRequest("a", 0, buf[:4]), ReadRequest("a", 4, buf[4:]), ReadRequest("a", 20, buf),
                     ReadRequest("b", 30, buf), ReadRequest("a", 30, buf)])
    assert [(k, o, [len(b) for b in bs]) for k, o, bs in runs] == [
        ("a", 0, [4, 6]), ("a", 20, [10]), ("b", 30, [10]), ("a", 30, [10])]


def test_values_are_binary_safe(conn: Connector) -> None:
    data = bytes(range(256)) * 3 + b"\r\n$-1\r\n*2\r\n-ERR x\r\n" + bytes(10)
    conn.write("m/bin", data)
    assert conn.read("m/bin") == data
    buf = bytearray(len(data) - 10)
    conn.readinto_many([ReadRequest("m/bin", 10, memoryview(buf))])
    assert bytes(buf) == data[10:]


def test_invalid_keys_are_refused(conn: Connector) -> None:
    for key in ("../escape", "/abs", "a//b"):
        with pytest.raises(ValueError):
            conn.write(key, b"x")


# --------------------------------------------------------------------------------------------- registry
def test_unknown_scheme_lists_known_schemes() -> None:
    with pytest.raises(ConfigError) as info:
        open_connector("nosuch://user:hunter2@host/x")
    message = str(info.value)
    assert all(s in message for s in ("file", "redis", "rediss", "s3"))
    assert "hunter2" not in message


def test_bare_path_opens_a_file_connector(tmp_path) -> None:
    conn = open_connector(str(tmp_path))
    assert isinstance(conn, FileConnector)
    conn.write("k", b"v")
    assert (tmp_path / "k").read_bytes() == b"v"


def test_register_connector(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(connectors, "_registered", {})  # keep the registration local to this test

    class Local(FileConnector):
        schemes = ("testlocal",)

        def __init__(self, url: str):
            super().__init__(str(tmp_path))
            self.url = url

    register_connector("testlocal", Local)
    conn = open_connector("testlocal://anything")
    assert isinstance(conn, Local) and repr(conn) == "Local('testlocal://anything')"


def test_builtin_table_agrees_with_declared_schemes() -> None:
    """The registry names built-ins lazily; each class must declare exactly the schemes the table gives it."""
    by_target: dict[str, set[str]] = {}
    for scheme, (target, _) in connectors._BUILTIN.items():
        by_target.setdefault(target, set()).add(scheme)
    for target, schemes in by_target.items():
        module, _, name = target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Connector) and set(cls.schemes) == schemes, target
        assert all(connectors.connector_class(f"{s}://h/x") is cls for s in schemes)


def _install_entry_points(root: Path, monkeypatch: pytest.MonkeyPatch, **eps: str) -> None:
    """A minimal installed distribution on sys.path whose entry points (group raydist_loader.connectors) are ``eps``."""
    info = root / "fakeplugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in eps.items())
    (info / "entry_points.txt").write_text(f"[{connectors.ENTRY_POINT_GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(root))


def test_entry_point_plugins(tmp_path, monkeypatch) -> None:
    _install_entry_points(
        tmp_path / "site",
        monkeypatch,
        plugfile="raydist_loader.connectors.file:FileConnector",
        notaconnector="json:dumps",
        brokenplug="raydist_loader_no_such_module:Thing",
    )
    assert {"plugfile", "notaconnector", "brokenplug"} <= set(connectors.known_schemes())
    assert connectors.connector_class("plugfile://x") is FileConnector
    with pytest.raises(ConfigError) as info:
        open_connector("notaconnector://host/x")
    message = str(info.value)
    assert "entry point 'notaconnector' = 'json:dumps'" in message and "fakeplugin" in message
    assert "not a subclass of raydist_loader.connectors.Connector" in message
    with pytest.raises(MissingDependencyError, match="entry point 'brokenplug'.*raydist_loader_no_such_module"):
        open_connector("brokenplug://host/x")


def test_register_connector_refuses_a_non_connector() -> None:
    with pytest.raises(ConfigError, match="register_connector\\('bad', ...\\) gives .*not a subclass"):
        register_connector("bad", dict)  # type: ignore[arg-type]


@pytest.mark.parametrize(("url", "extra"), [("s3://bucket/models", "s3"), ("redis://127.0.0.1:1/0", "redis")])
def test_missing_extra_is_named(tmp_path, url: str, extra: str) -> None:
    """With boto3 and redis-py not importable, the package still imports and runs (file://), and using a backend
    whose extra is missing is one CLI error line naming the extra to install."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['boto3'] = None\nsys.modules['redis'] = None\n")
    env = {"PYTHONPATH": str(hide), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raydist_loader", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)

    proc = cli("inspect", url, "--model", "m")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydist-loader: error: "), proc.stderr
    assert f"pip install 'raydist-loader[{extra}]'" in lines[0]
    proc = cli("inspect", str(tmp_path / "store"), "--model", "m")  # file:// needs no extra
    assert proc.returncode == 2 and "publish" in proc.stderr and "raydist-loader[" not in proc.stderr


def test_redis_url_secret_never_shown(redis_server) -> None:
    conn = open_connector(f"redis://user:secret@127.0.0.1:{redis_server.port}/0")
    assert "secret" not in repr(conn) and "secret" not in conn.describe()
    by_keyword = open_connector(redis_server.url, password="kwsecret", username="bob")
    assert "kwsecret" not in repr(by_keyword) and "kwsecret" not in repr(vars(by_keyword))


# --------------------------------------------------------------------------------------------- Redis
@pytest.fixture
def acl_user(redis_server) -> Iterator[str]:
    """A Redis ACL user ``alice`` with password ``pw``; returns her URL."""
    redis_server.start()
    with redis_server.client() as client:
        client.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all")
        yield f"redis://alice:pw@127.0.0.1:{redis_server.port}/0"
        client.execute_command("ACL", "DELUSER", "alice")


def test_redis_acl_user(acl_user: str) -> None:
    with open_connector(acl_user) as conn:
        conn.write("acl/k", b"value")
        assert conn.read("acl/k") == b"value"
        buf = bytearray(3)
        conn.readinto_many([ReadRequest("acl/k", 1, memoryview(buf))])
        assert buf == b"alu"


def test_redis_keyword_credentials_override_the_url(acl_user: str) -> None:
    url = acl_user.replace("alice:pw@", "nobody:wrong@")
    with open_connector(url, username="alice", password="pw") as conn:
        conn.write("acl/k2", b"ok")
        assert conn.read("acl/k2") == b"ok"


@pytest.mark.parametrize("path", ["raw-read", "control"])
def test_redis_wrong_password(acl_user: str, path: str) -> None:
    url = acl_user.replace("alice:pw@", "alice:not-the-pw@")
    with open_connector(url) as conn, pytest.raises(BackendError) as info:
        if path == "raw-read":
            conn.readinto("acl/k", 0, memoryview(bytearray(1)))
        else:
            conn.stat("acl/k")
    message = str(info.value)
    assert "authentication failed" in message and "'alice'" in message
    assert "not-the-pw" not in message and "not-the-pw" not in repr(info.value)
    assert not info.value.transient


def test_redis_stopped_server_is_transient_and_recovers(redis_server) -> None:
    redis_server.start()
    with open_connector(redis_server.url) as conn:
        conn.write("k", b"abc")
        conn.readinto("k", 0, memoryview(bytearray(3)))  # opens this thread's raw connection
        redis_server.stop()
        try:
            for op in (lambda: conn.readinto("k", 0, memoryview(bytearray(3))), lambda: conn.stat("k")):
                start = time.monotonic()
                with pytest.raises(BackendError) as info:
                    op()
                assert time.monotonic() - start < 10
                assert info.value.transient and redis_server.url in str(info.value)
        finally:
            redis_server.start()
        conn.write("k", b"back")  # both the raw and the redis-py connections reconnect
        assert conn.read("k") == b"back"


def test_redis_concurrent_threads(redis_server) -> None:
    redis_server.start()
    values = {f"t/{i}": pattern(200_000 + i, seed=i) for i in range(8)}
    errors: list[BaseException] = []
    with open_connector(redis_server.url) as conn:
        for key, value in values.items():
            conn.write(key, value)

        def reader(seed: int) -> None:
            try:
                for key in random.Random(seed).sample(sorted(values), len(values)):
                    buf = bytearray(len(values[key]))
                    conn.readinto_many([ReadRequest(key, 0, memoryview(buf))])
                    assert buf == values[key]
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_redis_eviction_policy_warning(redis_server) -> None:
    redis_server.start()
    with open_connector(redis_server.url) as conn, redis_server.client() as client:
        assert conn.check_eviction_policy() is None
        client.config_set("maxmemory", "1gb")
        client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            warning = conn.check_eviction_policy()
        finally:
            client.config_set("maxmemory", "0")
            client.config_set("maxmemory-policy", "noeviction")
    assert warning and "allkeys-lru" in warning and "noeviction" in warning


def test_redis_pipelined_writes_land_and_a_refused_set_is_named(redis_server) -> None:
    """write_many pipelines SETs from the callers' buffers (small values coalesced, large ones sent as they are);
    a SET the server refuses (OOM under maxmemory) is an error naming its key, and the connection stays usable."""
    redis_server.start()
    values = {f"w/{i}": pattern(n, seed=i) for i, n in enumerate([10, 70_000, 3, 2 * MiB, 0, 65_536])}
    with open_connector(redis_server.url) as conn, redis_server.client() as client:
        conn.write_many([(k, memoryview(v)) for k, v in values.items()])
        assert {k: conn.read(k) for k in values} == values
        client.config_set("maxmemory", str(client.info("memory")["used_memory"] + MiB))
        try:
            with pytest.raises(BackendError, match="w/big.*OOM"):
                conn.write_many([("w/small", b"ok"), ("w/big", pattern(4 * MiB)), ("w/after", b"x")])
        finally:
            client.config_set("maxmemory", "0")
        conn.write("w/again", b"still usable")
        assert conn.read("w/again") == b"still usable" and conn.read("w/small") == b"ok"


def test_redis_cluster_node_without_slots_is_one_clear_error(start_redis) -> None:
    """A node in cluster mode whose cluster was never created: one permanent error naming the node and the fix; with
    half its slots, CLUSTERDOWN names the node (transient: retried until the deadline) and a key of an unserved slot
    names the slot; a cluster URL naming another database than 0 is a ConfigError (a cluster has only db 0)."""
    node = start_redis("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    with open_connector(node.url) as conn:
        for op in (lambda: conn.readinto("k", 0, memoryview(bytearray(1))), lambda: conn.write("k", b"v")):
            with pytest.raises(BackendError, match=f"127.0.0.1:{node.port} has no hash slots.*cluster create") as info:
                op()
            assert not info.value.transient
    from redis.crc import key_slot

    low, high = (next(k for k in (f"k{i}" for i in range(999)) if test(key_slot(k.encode()))) for test in
                 (lambda s: s < 8192, lambda s: s >= 8192))
    node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)  # half the slots: the cluster is down
    with open_connector(node.url) as conn:
        with pytest.raises(BackendError, match=f"cluster node 127.0.0.1:{node.port}.*CLUSTERDOWN") as info:
            conn.readinto(low, 0, memoryview(bytearray(1)))
        assert info.value.transient and info.value.until_deadline, "retried until the deadline (a failover)"
        with pytest.raises(BackendError, match=f"hash slot {key_slot(high.encode())} .* has no master"):
            conn.readinto(high, 0, memoryview(bytearray(1)))
    node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
    deadline = time.monotonic() + 10
    while b"cluster_state:ok" not in node.client().execute_command("CLUSTER", "INFO"):
        assert time.monotonic() < deadline, "the one-node cluster did not reach cluster_state:ok"
        time.sleep(0.05)
    with open_connector(node.url.replace("/0", "/1")) as conn:
        with pytest.raises(ConfigError, match="names database 1.*only database 0: use /0"):
            conn.readinto("k", 0, memoryview(bytearray(1)))
    with open_connector(node.url) as conn:  # one master holding every slot: a working cluster
        conn.write("k", b"v")
        assert conn.read("k") == b"v" and conn.masters() == [f"127.0.0.1:{node.port}"]


def test_redis_tls(start_redis, tls_files) -> None:
    server = start_redis(tls=tls_files)
    with open_connector(server.url) as conn:
        conn.write("tls/k", pattern(300_000))
        assert conn.read("tls/k") == pattern(300_000)
        buf = bytearray(1000)
        conn.readinto_many([ReadRequest("tls/k", 5, memoryview(buf))])
        assert buf == pattern(300_000)[5:1005]
    without_ca = server.url.split("?")[0]
    with open_connector(without_ca) as conn, pytest.raises(BackendError, match="certificate") as info:
        conn.readinto("tls/k", 0, memoryview(bytearray(1)))
    assert not info.value.transient
    with open_connector(without_ca + "?ssl_cert_reqs=none") as conn:
        assert conn.read("tls/k") == pattern(300_000)


def test_redis_bad_url_options() -> None:
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        open_connector("rediss://127.0.0.1:1/0?ssl_cert_reqs=maybe")
    with pytest.raises(ConfigError, match="unknown Redis URL option"):
        open_connector("redis://127.0.0.1:1/0?colour=blue")
    with pytest.raises(ConfigError, match="database"):
        open_connector("redis://127.0.0.1:1/zero")


# --------------------------------------------------------------------------------------------- S3
@pytest.mark.slow
def test_s3_lists_past_1000_keys(s3_server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bucket = s3_server.make_bucket("test-many-keys")
    keys = [f"many/{i:05d}" for i in range(1100)]
    with open_connector(f"s3://{bucket}/root") as conn:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: conn.write(k, b""), keys))
        assert list(conn.list("many/")) == keys


def test_s3_large_write_is_multipart(s3_server, small_multipart: None) -> None:
    import boto3

    bucket = s3_server.make_bucket("test-multipart")
    with open_connector(f"s3://{bucket}") as conn:
        conn.write("big", [pattern(5 * MiB), pattern(5 * MiB, seed=1)])
        assert conn.list() and list(conn.list()) == ["big"]
    etag = boto3.client("s3").head_object(Bucket=bucket, Key="big")["ETag"]
    assert etag.strip('"').endswith("-2"), etag


def test_s3_failed_multipart_leaves_nothing(s3_server, small_multipart: None) -> None:
    import boto3

    bucket = s3_server.make_bucket("test-abort")

    def blocks() -> Iterator[bytes]:
        yield pattern(16 * MiB)  # three parts already uploading when the producer fails
        raise RuntimeError("producer failed")

    with open_connector(f"s3://{bucket}") as conn, pytest.raises(RuntimeError):
        conn.write("half", blocks())
    client = boto3.client("s3")
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


def test_s3_missing_bucket(s3_server) -> None:
    with open_connector("s3://no-such-bucket-here/x") as conn, pytest.raises(BackendError) as info:
        conn.write("k", b"v")
    assert "no-such-bucket-here" in str(info.value) and not info.value.transient


def test_s3_unreachable_endpoint_is_transient(s3_server) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open_connector(f"s3://b/x?endpoint_url=http://127.0.0.1:{port}") as conn:
        with pytest.raises(BackendError) as info:
            conn.stat("k")
    assert info.value.transient and f"127.0.0.1:{port}" in str(info.value)


class _IgnoresRange(http.server.BaseHTTPRequestHandler):
    """An "S3" that answers every GET with 200 and the whole object, whatever Range asks for."""

    protocol_version = "HTTP/1.1"
    body = pattern(4096, seed=5)
    closed = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def finish(self) -> None:
        super().finish()
        type(self).closed.set()  # the client closed the connection

    def log_message(self, *args: object) -> None:
        pass


def test_s3_ranged_read_answered_with_the_whole_object_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _IgnoresRange)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _IgnoresRange.closed.clear()
    try:
        buf = bytearray(100)
        with open_connector(f"s3://bucket/x?endpoint_url=http://127.0.0.1:{server.server_port}") as conn:
            with pytest.raises(BackendError) as info:
                conn.readinto("m/v1/part.safetensors", 1000, memoryview(buf))
            # checked while the connector (and its connection pool) is still open
            assert _IgnoresRange.closed.wait(5), "the response was closed, not left holding its connection"
        message = str(info.value)
        assert "'m/v1/part.safetensors'" in message and "bytes 1000-1099" in message and "HTTP 200" in message
        assert buf == bytearray(100), "none of the wrong bytes landed"
    finally:
        server.shutdown()
        server.server_close()


def test_cluster_slot_maps_parse_shards_and_slots_replies() -> None:
    """CLUSTER SHARDS (Redis 7: the online master owns its shard's ranges, a failed one is skipped, TLS ports when
    asked) and CLUSTER SLOTS (Redis 6: the first node of a range owns it; an empty host is the node asked)."""
    from raydist_loader.connectors._cluster import SLOTS, parse_shards, parse_slots

    def node(port, role, health=b"online", tls_port=None):
        extra = [b"tls-port", tls_port] if tls_port else []
        return [b"id", b"x", b"port", port, *extra, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1",
                b"role", role, b"health", health]

    shards = [
        [b"slots", [0, 99, 200, 16383], b"nodes", [node(7001, b"master", tls_port=8001), node(7004, b"replica")]],
        [b"slots", [100, 199], b"nodes", [node(7002, b"master", b"fail"), node(7005, b"master")]],
        [b"slots", [], b"nodes", [node(7003, b"master", b"fail")]],  # a failed master that lost its slots
    ]
    found = parse_shards(shards, ("10.0.0.1", 7001), tls=False)
    assert found.owners[0] == found.owners[16383] == ("127.0.0.1", 7001) and found.owners[150] == ("127.0.0.1", 7005)
    assert found.masters == (("127.0.0.1", 7001), ("127.0.0.1", 7005)) and len(found.nodes) == 5
    assert parse_shards(shards, ("10.0.0.1", 7001), tls=True).owners[0] == ("127.0.0.1", 8001)
    slots = [[0, 8191, [b"", 7001, b"id1"], [b"127.0.0.1", 7004, b"id4"]], [8192, 16383, [b"10.0.0.2", 7002, b"i"]]]
    found = parse_slots(slots, ("10.0.0.1", 7001))
    assert found.owners[0] == ("10.0.0.1", 7001) and found.owners[SLOTS - 1] == ("10.0.0.2", 7002)
    assert found.route(["a", "b", "c"]) and set(found.route(["k"] * 3)) <= set(found.masters)
