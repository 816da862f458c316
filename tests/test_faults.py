"""Faults against real servers on loopback: backend outages, dead actors, S3 5xx, corruption, concurrent loads.

Most tests run at the worker level (ShardLoader / load_shard in this process); the Ray tests at the end share one
module-scoped Ray session whose workers register the ``faulty+`` connector through a process setup hook.
Every wait is bounded.
"""

from __future__ import annotations

import http.client
import http.server
import random
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import torch

import raydist_loader as rl
from raydist_loader import connectors
from raydist_loader.errors import BackendError, RaydistError, VerificationError
from raydist_loader.load.worker import ShardLoader
from raydist_loader.store.manifest import Manifest
from raydist_loader.store.plan import expected_digests, make_plan
from raydist_loader.store.versions import read_manifest, read_manifest_bytes
from raydist_loader.testing import faulty

from .shards import assert_shards_match, expected_slice, original_tensors

PW = "s3cret-Pw-7f1c"
ACL = ("--user", "loader", "on", f">{PW}", "~*", "+@all")
PERSIST = ("--appendonly", "yes", "--appendfsync", "always")  # the data survives a kill -9 and a restart


@pytest.fixture(scope="module", autouse=True)
def faulty_scheme():
    """faulty+<scheme>:// in this process for this module only."""
    saved = dict(connectors._registered)
    faulty.FaultyConnector.register()
    yield
    connectors._registered.clear()
    connectors._registered.update(saved)


@pytest.fixture(scope="module")
def ckpts(two_llamas):
    return two_llamas


@pytest.fixture(scope="module")
def originals(ckpts):
    return tuple(original_tensors(c) for c in ckpts)


def fresh_redis(server) -> str:
    server.start()
    with server.client() as client:
        client.flushdb()
    return server.url


def with_query(url: str, **params) -> str:
    """``redis://h:p/0`` -> ``faulty+redis://h:p/0?k=v...`` (keeps an existing query)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    sep = "&" if "?" in url else "?"
    return f"faulty+{url}{sep}{query}" if query else f"faulty+{url}"


def loader(url, raw, tp, rank, **kw) -> ShardLoader:
    return ShardLoader(url, raw, tp, rank, **kw)


def manifest_raw(url, model="m", **options) -> bytes:
    with rl.open_connector(url, **options) as conn:
        return read_manifest_bytes(conn, model)[1]


def assert_rank_matches(original, tensors, metadata):
    for name, full in original.items():
        assert torch.equal(tensors[name], expected_slice(full, metadata[name])), name


def run_in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e
        box["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_until(cond, timeout: float, what: str, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


# --------------------------------------------------------------------------------------------- transient faults
@pytest.mark.parametrize("kind", ["reset", "timeout", "loading", "refused"])
def test_transient_read_faults_are_retried_and_the_load_verifies(redis_server, ckpts, originals, kind):
    url = fresh_redis(redis_server)
    rl.publish(ckpts[0], url, "m", max_tp=2)
    raw = manifest_raw(url)
    bad = with_query(url, fail=3, fail_error=kind, request_bytes=8192)
    ld = loader(bad, raw, 2, 1, retries={"attempts": 5, "base_delay_s": 0.01, "max_delay_s": 0.05})
    try:
        report = ld.load()
        assert ld.connector.failures_injected == 3
        assert not report.failures and report.digest == report.expected_digest
        assert_rank_matches(originals[0], ld.tensors, ld.metadata())
    finally:
        ld.close()


@pytest.mark.parametrize("kind", ["auth", "missing"])
def test_permanent_read_faults_fail_at_once(redis_server, ckpts, kind):
    url = fresh_redis(redis_server)
    rl.publish(ckpts[0], url, "m", max_tp=2)
    raw = manifest_raw(url)
    ld = loader(with_query(url, fail=100, fail_error=kind, request_bytes=8192), raw, 2, 0, retries={"attempts": 5})
    t0 = time.monotonic()
    try:
        with pytest.raises(RaydistError, match="authentication failed" if kind == "auth" else "does not exist"):
            ld.load()
        # each batch fails on its first try: no retry, no backoff
        assert ld.connector.failures_injected <= len(ld.plan.reads) + 2
        assert time.monotonic() - t0 < 3
    finally:
        ld.close()


# --------------------------------------------------------------------------------------------- redis outage
def _outage_loader(server, ckpt, delay_ms=300, request_bytes=16384):
    """Publish through a persisted ACL-protected server; a loader whose reads are slowed down."""
    base = f"redis://loader@127.0.0.1:{server.port}/0"
    rl.publish(ckpt, base, "m", max_tp=2, connector_options={"password": PW})
    raw = manifest_raw(base, password=PW)
    slow = with_query(f"redis://loader:{PW}@127.0.0.1:{server.port}/0", delay_ms=delay_ms,
                      request_bytes=request_bytes)
    return base, raw, slow


def test_redis_killed_mid_load_gives_a_clear_error_then_loads_after_restart(start_redis, ckpts, originals):
    server = start_redis(*PERSIST, *ACL)
    base, raw, slow = _outage_loader(server, ckpts[0])
    ld = loader(slow, raw, 2, 0)
    thread, box = run_in_thread(ld.load)
    wait_until(lambda: 0 < ld.progress()[0], 20, "the first bytes to land")
    assert ld.progress()[0] < ld.progress()[1], "the kill lands in the middle of the load"
    server.stop()
    killed = time.monotonic()
    thread.join(15)
    assert not thread.is_alive() and "error" in box, "the load must fail, not hang"
    assert box["at"] - killed < 10, f"error after {box['at'] - killed:.1f}s"
    err = box["error"]
    assert isinstance(err, BackendError), repr(err)
    msg = str(err)
    assert f"redis://loader:***@127.0.0.1:{server.port}/0" in msg and "Redis" in msg, msg
    assert PW not in msg and PW not in repr(err)
    ld.close()

    server.start()  # same port, same data (append-only file)
    shard = rl.load_shard("m", base, 2, 0, device="cpu", connector_options={"password": PW})
    assert shard.report.digest == shard.report.expected_digest and not shard.report.failures
    assert_rank_matches(originals[0], shard.tensors, shard.metadata)


def test_redis_restarted_during_a_load_is_ridden_out_by_retries(start_redis, ckpts, originals):
    server = start_redis(*PERSIST, *ACL)
    base, raw, slow = _outage_loader(server, ckpts[0], delay_ms=100, request_bytes=8192)
    ld = loader(slow, raw, 2, 1, retries={"attempts": 30, "base_delay_s": 0.1, "max_delay_s": 0.5, "deadline_s": 20})
    thread, box = run_in_thread(ld.load)
    wait_until(lambda: 0 < ld.progress()[0], 20, "the first bytes to land")
    server.stop()
    time.sleep(0.5)
    server.start()
    thread.join(30)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    report = box["value"]
    assert not report.failures and report.digest == report.expected_digest
    assert_rank_matches(originals[0], ld.tensors, ld.metadata())
    ld.close()


# --------------------------------------------------------------------------------------------- S3 answering 5xx
class FaultyS3Proxy:
    """An HTTP proxy in front of moto that answers some object GETs (the manifest's whole-object GET, the chunks'
    ranged ones; not listings) with 503 SlowDown (or 500 InternalError).

    ``every``: fail every Nth object GET; ``burst``: fail the first N object GETs in a row (more than boto3's own
    3 attempts, so only the loader's retries get through); ``max_faults`` caps the total.
    """

    def __init__(self, upstream: str, *, every: int = 0, burst: int = 0, max_faults: int = 1000, status=503):
        self.upstream = urlsplit(upstream)
        self.every, self.burst, self.max_faults, self.status = every, burst, max_faults, status
        self.gets = self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and "?" not in self.path and proxy._fault():
                    code = "SlowDown" if proxy.status == 503 else "InternalError"
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           "<Message>Please reduce your request rate.</Message></Error>").encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _fault(self) -> bool:
        with self._lock:
            self.gets += 1
            n = self.gets
            fire = self.faults < self.max_faults and (
                (self.burst and n <= self.burst) or (self.every and n % self.every == 0)
            )
            self.faults += bool(fire)
            return bool(fire)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_store(s3_server):
    return s3_server, f"s3://{s3_server.make_bucket(f'faults-{uuid.uuid4().hex[:8]}')}/store"


@pytest.mark.parametrize("status", [503, 500])
def test_s3_5xx_on_some_reads_is_retried_and_verifies(s3_store, ckpts, originals, status):
    s3, url = s3_store
    rl.publish(ckpts[0], url, "m", max_tp=2)
    proxy = FaultyS3Proxy(s3.endpoint, every=2, max_faults=2, status=status)
    try:
        via = f"{url}?endpoint_url={proxy.endpoint}"
        shard = rl.load_shard("m", via, 2, 1, device="cpu", concurrency=1)
        assert proxy.faults == 2, f"only {proxy.faults} faults injected over {proxy.gets} object GETs"
        assert not shard.report.failures and shard.report.digest == shard.report.expected_digest
        assert_rank_matches(originals[0], shard.tensors, shard.metadata)
    finally:
        proxy.close()


def test_s3_burst_of_503s_beyond_boto3_retries_is_ridden_out(s3_store, ckpts, originals):
    s3, url = s3_store
    rl.publish(ckpts[0], url, "m", max_tp=2)
    proxy = FaultyS3Proxy(s3.endpoint, burst=4)  # boto3 makes 3 attempts per request
    try:
        raw = manifest_raw(url)
        ld = loader(f"{url}?endpoint_url={proxy.endpoint}", raw, 1, 0, concurrency=1,
                    retries={"attempts": 5, "base_delay_s": 0.05, "max_delay_s": 0.2})
        report = ld.load()
        assert proxy.faults == 4 and not report.failures
        assert_rank_matches(originals[0], ld.tensors, ld.metadata())
        ld.close()
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------- corruption
def _ranks_reading(manifest: Manifest, tp: int, tensor: str, chunk: str) -> list[int]:
    out = []
    for rank in range(tp):
        plan = make_plan(manifest, tp, rank)
        if any(plan.tensors[r.tensor].name == tensor and r.chunk == chunk for r in plan.reads):
            out.append(rank)
    return out


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_every_stored_byte_flip_is_detected_naming_rank_tensor_chunk(backend, tmp_path, redis_server, ckpts):
    """100 trials per backend (200 in all): flip one random byte of one random stored chunk, load a rank that reads
    it, expect VerificationError naming that rank, tensor and chunk; then restore the byte."""
    url = f"file://{tmp_path}/store" if backend == "file" else fresh_redis(redis_server)
    rl.publish(ckpts[0], url, "m", max_tp=2)
    rng = random.Random(1234 if backend == "file" else 4321)
    caught = 0
    with rl.open_connector(url) as conn:
        manifest = read_manifest(conn, "m")
        raw = read_manifest_bytes(conn, "m")[1]
        chunks = [(name, c) for name in manifest.tensors for c in manifest.chunks(name) if c.nbytes]
        readers = {(tp, n, c.id): _ranks_reading(manifest, tp, n, c.id) for tp in (1, 2) for n, c in chunks}
        for _ in range(100):
            name, chunk = rng.choice(chunks)
            at = rng.randrange(chunk.nbytes)
            part_at = at
            for part in chunk.parts:  # the stored object and offset of the chunk's byte `at`
                if part_at < part.nbytes:
                    break
                part_at -= part.nbytes
            data = bytearray(conn.read(part.object))
            original = bytes(data)
            data[part.offset + part_at] ^= 1 << rng.randrange(8)
            conn.write(part.object, bytes(data))
            tp = rng.choice((1, 2))
            rank = rng.choice(readers[(tp, name, chunk.id)])
            ld = ShardLoader(url, raw, tp, rank, device="cpu")
            try:
                report = ld.load()
                assert report.digest != report.expected_digest
                assert [(f["rank"], f["tensor"], f["chunk"]) for f in report.failures] == [(rank, name, chunk.id)]
                assert report.repulled == 1  # the store itself is bad: the one re-pull does not heal it
            finally:
                ld.close()
            caught += 1
            conn.write(part.object, original)
        # the public path raises with the same names
        name, chunk = chunks[len(chunks) // 2]
        part = chunk.parts[0]
        data = bytearray(conn.read(part.object))
        data[part.offset] ^= 0x01
        conn.write(part.object, bytes(data))
        rank = readers[(2, name, chunk.id)][-1]
        with pytest.raises(VerificationError, match=rf"rank {rank}: tensor {name} chunk {chunk.id}: digest"):
            rl.load_shard("m", url, 2, rank, device="cpu")
    assert caught == 100


def test_corruption_in_transit_is_healed_by_the_re_pull(redis_server, ckpts, originals):
    url = fresh_redis(redis_server)
    rl.publish(ckpts[0], url, "m", max_tp=2)
    # every read of a v_proj/gate_proj chunk is corrupted the first time only
    bad = with_query(url, corrupt="_proj", corrupt_times=1, seed=7)
    for rank in range(2):
        shard = rl.load_shard("m", bad, 2, rank, device="cpu")
        assert not shard.report.failures and shard.report.digest == shard.report.expected_digest
        assert_rank_matches(originals[0], shard.tensors, shard.metadata)
    # the worker saw the corruption and re-pulled exactly the corrupted chunks, once
    ld = ShardLoader(bad, manifest_raw(url), 2, 0, device="cpu")
    report = ld.load()
    assert report.repulled > 0 and report.repulled == ld.connector.corruptions_injected
    assert not report.failures and report.digest == report.expected_digest
    ld.close()
    # corrupted on the re-pull too: one clear error, never a silently wrong shard
    with pytest.raises(VerificationError, match=r"(?s)rank 1 of model 'm' failed verification after one re-pull.*"
                       r"rank 1: tensor \S+_proj\S* chunk \S+: digest"):
        rl.load_shard("m", with_query(url, corrupt="_proj", corrupt_times=2), 2, 1, device="cpu")


# --------------------------------------------------------------------------------------------- concurrency
def test_eight_concurrent_loads_on_one_redis_and_one_s3_store(redis_server, s3_store, ckpts, originals):
    _, s3_url = s3_store
    redis_url = fresh_redis(redis_server)
    for url in (redis_url, s3_url):
        rl.publish(ckpts[0], url, "a", max_tp=2)
        rl.publish(ckpts[1], url, "b", max_tp=2)
    jobs = [(url, model, rank) for url in (redis_url, s3_url) for model in ("a", "b") for rank in (0, 1)]
    barrier = threading.Barrier(len(jobs))
    results: dict = {}

    def one(job):
        barrier.wait(10)
        url, model, rank = job
        results[job] = rl.load_shard(model, url, 2, rank, device="cpu", concurrency=2)

    threads = [threading.Thread(target=one, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8, f"{8 - len(results)} loads failed or hung"
    for url in (redis_url, s3_url):
        for model, original in (("a", originals[0]), ("b", originals[1])):
            shards = [results[(url, model, r)] for r in (0, 1)]
            assert all(s.report.model == model and not s.report.failures for s in shards)
            assert_shards_match(original, [(s.tensors, s.metadata) for s in shards])


def test_publish_during_loads_never_mixes_versions_and_gc_removes_the_old(redis_server, ckpts, originals):
    url = fresh_redis(redis_server)
    rl.publish(ckpts[0], url, "m", max_tp=2)
    raw_a = manifest_raw(url)
    slow = with_query(url, delay_ms=20, request_bytes=8192)
    done: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    published: dict[str, float] = {}

    def reader(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            tp = rng.choice((1, 2))
            rank = rng.randrange(tp)
            t0 = time.monotonic()
            try:
                shard = rl.load_shard("m", slow, tp, rank, device="cpu")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            done.append((tp, rank, t0, time.monotonic(), shard))

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(done) >= 3 or errors, 30, "loads of the first version")
        published["start"] = time.monotonic()
        rl.publish(ckpts[1], url, "m", max_tp=2)
        published["end"] = time.monotonic()
        wait_until(lambda: sum(d[2] > published["end"] for d in done) >= 3 or errors, 30, "loads of the second")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    raw_b = manifest_raw(url)
    versions = {}
    for raw, original in ((raw_a, originals[0]), (raw_b, originals[1])):
        m = Manifest.from_json(raw)
        versions[m.version] = (m, original)
    assert len(versions) == 2
    overlapped = 0
    for tp, rank, t0, t1, shard in done:
        manifest, original = versions[shard.report.version]
        assert shard.report.digest == expected_digests(manifest, tp)[rank]
        assert_rank_matches(original, shard.tensors, shard.metadata)  # the whole shard is one version
        overlapped += t0 < published["end"] and t1 > published["start"]
    seen = {shard.report.version for *_, shard in done}
    assert seen == set(versions), "loads saw both versions"
    assert overlapped >= 1, "at least one load was in flight during the publish"

    old = Manifest.from_json(raw_a).version
    with rl.open_connector(url) as conn:
        assert any(k.startswith(f"m/{old}/") for k in conn.list("m/"))
    result = rl.gc(url, "m", grace_s=0)
    assert result["deleted"] == [f"m/{old}/"] and result["objects"] > 0
    with rl.open_connector(url) as conn:
        assert not any(k.startswith(f"m/{old}/") for k in conn.list("m/")), "gc left chunks of the old version"
    assert rl.verify(url, "m").ok
    shard = rl.load_shard("m", url, 2, 1, device="cpu")
    assert_rank_matches(originals[1], shard.tensors, shard.metadata)


# --------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_faults(redis_server):
    """One local Ray for this module; its worker processes register faulty+ at start-up."""
    import ray

    hook = {"worker_process_setup_hook": "raydist_loader.testing.faulty.register_all"}
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False, runtime_env=hook)
    yield ray
    ray.shutdown()


def _actor(ray, name: str, not_id=None, timeout: float = 30.0):
    """The named actor (optionally: a new one, not ``not_id``), once it has started pulling."""
    found = {}

    def ready():
        try:
            handle = ray.get_actor(name, namespace="raydist")  # held actors live there
        except ValueError:
            return False
        if not_id is not None and handle._actor_id == not_id:
            return False
        try:
            got, total = ray.get(handle.progress.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - not up yet, or the old one dying
            return False
        found["h"] = handle
        return 0 < got < total

    wait_until(ready, timeout, f"actor {name} to be mid-pull", step=0.05)
    return found["h"]



@pytest.mark.ray
def test_ray_redis_killed_mid_load_then_restarted(ray_faults, start_redis, ckpts, originals):
    ray = ray_faults
    server = start_redis(*PERSIST, *ACL)
    base, _, slow = _outage_loader(server, ckpts[0], delay_ms=400, request_bytes=16384)
    thread, box = run_in_thread(lambda: rl.load_across_cluster("m", slow, tp=2, progress=False, hold=True))
    _actor(ray, "raydist:m:0")
    server.stop()
    killed = time.monotonic()
    thread.join(30)
    assert not thread.is_alive() and "error" in box, "no LoadedModel when the backend is down"
    assert box["at"] - killed < 10, f"error after {box['at'] - killed:.1f}s"
    msg = str(box["error"])
    assert isinstance(box["error"], RaydistError) and "rank" in msg and "failed" in msg, msg
    assert f"redis://loader:***@127.0.0.1:{server.port}/0" in msg and PW not in msg, msg

    server.start()
    with rl.load_across_cluster("m", base, tp=2, progress=False, connector_options={"password": PW}) as loaded:
        assert loaded.report.verified
        assert_shards_match(originals[0], [(loaded.state_dict(r), loaded.metadata(r)) for r in range(2)])


def _slow_named_load(redis_server, ckpt):
    """A tp=2 load with slowed reads and named actors (``raydist:m:<rank>``), running in a thread."""
    url = fresh_redis(redis_server)
    rl.publish(ckpt, url, "m", max_tp=2)
    slow = with_query(url, delay_ms=300, request_bytes=16384)
    return run_in_thread(lambda: rl.load_across_cluster("m", slow, tp=2, progress=False, hold=True))


@pytest.mark.ray
def test_ray_actor_killed_mid_pull_is_restarted_and_the_load_verifies(ray_faults, redis_server, ckpts, originals):
    ray = ray_faults
    thread, box = _slow_named_load(redis_server, ckpts[0])
    victim = _actor(ray, "raydist:m:1")
    ray.kill(victim, no_restart=True)
    thread.join(60)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    with box["value"] as loaded:
        report = loaded.report
        assert report.verified and [r.restarts for r in report.ranks] == [0, 1]
        assert all(r.digest == r.expected_digest for r in report.ranks)
        assert_shards_match(originals[0], [(loaded.state_dict(r), loaded.metadata(r)) for r in range(2)])


@pytest.mark.ray
def test_ray_actor_killed_again_after_its_restart_gives_one_clear_error(ray_faults, redis_server, ckpts):
    ray = ray_faults
    thread, box = _slow_named_load(redis_server, ckpts[0])
    first = _actor(ray, "raydist:m:1")
    ray.kill(first, no_restart=True)
    second = _actor(ray, "raydist:m:1", not_id=first._actor_id)
    ray.kill(second, no_restart=True)
    thread.join(60)
    assert not thread.is_alive() and "error" in box, "a LoadedModel with a dead rank must never be returned"
    assert isinstance(box["error"], RaydistError)
    assert "rank 1 failed: its actor died" in str(box["error"]) and "max_restarts=1 is exhausted" in str(box["error"])
    wait_until(lambda: all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()), 10,
               "the placement group to be removed")


@pytest.mark.ray
def test_ray_corruption_in_transit_is_healed_by_the_coordinators_re_pull(ray_faults, redis_server, ckpts, originals):
    url = fresh_redis(redis_server)
    rl.publish(ckpts[0], url, "m", max_tp=2)
    with rl.load_across_cluster("m", with_query(url, corrupt="v_proj", seed=3), tp=2, progress=False) as loaded:
        report = loaded.report
        assert report.verified and all(r.repulled > 0 for r in report.ranks)
        assert all(not r.failures and r.digest == r.expected_digest for r in report.ranks)
        assert_shards_match(originals[0], [(loaded.state_dict(r), loaded.metadata(r)) for r in range(2)])


@pytest.mark.ray
def test_ray_a_publish_racing_a_load_with_replicas_leaves_every_rank_on_one_version(ray_faults, redis_server, ckpts,
                                                                                     originals, tmp_path):
    """The Ray path reads the manifest once, in the driver: with the first chunk read of all actors but one held
    until a new version is published, every rank of both replicas still loads the version the driver read, and the
    load holds a lease on it (gc keeps it though it is no longer current) until shutdown."""
    from raydist_loader.testing.hold import PublishWhenHeld

    url = fresh_redis(redis_server)
    v1 = rl.publish(ckpts[0], url, "m", max_tp=2).version
    hold = tmp_path / "hold"
    hold.mkdir()
    race = PublishWhenHeld({"hold": str(hold), "publish": {"ckpt": str(ckpts[1]), "url": url, "model": "m",
                                                           "max_tp": 2}})
    with rl.load_across_cluster("m", with_query(url, hold=hold, hold_key="::"), tp=2, replicas=2,
                                progress=False, num_cpus_per_actor=0.1) as loaded:
        raced = race.done()
        assert raced["error"] is None and raced["held"] and raced["published"] not in (None, v1)
        assert loaded.version == v1 and {r.version for r in loaded.report.ranks} == {v1}
        assert len(loaded.report.ranks) == 4 and loaded.report.verified
        for i in range(2):
            replica = loaded.replica(i)
            assert_shards_match(originals[0], [(replica.state_dict(r), replica.metadata(r)) for r in range(2)])
        (old,) = [v for v in rl.versions(url, "m") if v["version"] == v1]
        assert not old["current"] and [x["holder"] for x in old["leases"]] == ["ray load tp=2 replicas=2"]
        assert rl.gc(url, "m", grace_s=0)["deleted"] == [], "a version a load holds is never deleted"
    assert [v["leases"] for v in rl.versions(url, "m") if v["version"] == v1] == [[]], "released at shutdown"
    assert rl.gc(url, "m", grace_s=0)["deleted"] == [f"m/{v1}/"]
