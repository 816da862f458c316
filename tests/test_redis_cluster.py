"""Redis Cluster through a plain redis:// URL of one node: a real 3-master + 3-replica cluster on loopback, started
here; publish spreads chunks over the masters, loads read from all of them (load_shard and Ray at tp=2), and a
master's failover (its replica promoted) is survived."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass

import pytest
import ray
import torch

import raydist_loader as rl
from raydist_loader.errors import BackendError, ConfigError
from raydist_loader.store.versions import read_manifest
from raydist_loader.testing import faulty
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .conftest import SETUP_HINT, RedisServer, free_port
from .shards import assert_shards_match, original_tensors
from .test_faults import assert_rank_matches, loader, manifest_raw, run_in_thread, wait_until, with_query

pytestmark = pytest.mark.ray

PW = "cluster-Pw-3e9a"
ACL = ("--user", "loader", "on", f">{PW}", "~*", "&*", "+@all")
OPTS = {"password": PW}
# 3 s: short enough for a quick failover, long enough that a starved 2-core host does not make nodes flag each other
# as failing (at 1 s the cluster flapped to CLUSTERDOWN under a load average of 15)
NODE_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "3000")


@dataclass
class Cluster:
    """Six redis-servers in one cluster; ``url`` names the first node (as a user would: any one node)."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return f"redis://loader@127.0.0.1:{self.nodes[0].port}/0"

    def node(self, name: str) -> RedisServer:
        return next(n for n in self.nodes if f"127.0.0.1:{n.port}" == name)

    def masters(self) -> list[str]:
        with rl.open_connector(self.url, **OPTS) as conn:
            return conn.masters()

    def state_ok(self) -> bool:
        """Every running node says ``cluster_state:ok``."""
        try:
            live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
            return all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in live)
        except OSError:
            return False


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port(below=55536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("redis-cli") is None:
        pytest.fail(f"redis-cli is not installed or not on PATH: {SETUP_HINT}", pytrace=False)
    root = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for i in range(6):
            (root / str(i)).mkdir()
            nodes.append(RedisServer(port=_cluster_port(), workdir=root / str(i), extra_args=(*NODE_ARGS, *ACL)))
            nodes[-1].start()
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        found = Cluster(nodes)
        wait_until(found.state_ok, 20, "cluster_state:ok", step=0.1)
        yield found
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 8 layers: ~130 chunk keys, so their hash slots spread the bytes evenly over 3 masters
    return make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("cl") / "llama", dtype=torch.bfloat16, num_hidden_layers=8
    )


@pytest.fixture(scope="module")
def published(cluster, ckpt):
    """The model published once through node 0; every master's replica has caught up (WAIT)."""
    return _publish(cluster, ckpt)


def _publish(cluster: Cluster, ckpt):
    """Publish ``m`` and wait until every master's replica holds it (WAIT): a failover must not lose it."""
    result = rl.publish(ckpt, cluster.url, "m", max_tp=2, connector_options=OPTS)
    for name in cluster.masters():
        assert cluster.node(name).client().execute_command("WAIT", 1, 5000) == 1, f"{name}'s replica lags"
    return result


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _bytes_per_master(url: str) -> dict[str, int]:
    """Payload bytes of the current version of ``m`` held by each master."""
    with rl.open_connector(url, **OPTS) as conn:
        manifest = read_manifest(conn, "m")
        keys = list(conn.list(f"m/{manifest.version}/"))
        sizes = dict(zip(keys, conn.stat_many(keys), strict=True))
        return {node: sum(sizes[k] for k in owned) for node, owned in conn.nodes_of(keys).items()}


def test_publish_spreads_chunks_over_every_master_and_list_verify_gc_see_them_all(cluster, published, ckpt):
    masters = cluster.masters()
    assert len(masters) == 3
    per_master = _bytes_per_master(cluster.url)
    total = sum(per_master.values())
    print(f"\nbytes per master after publish ({total} in all): {per_master}")
    assert sorted(per_master) == sorted(masters), "every master holds chunks"
    assert total >= published.bytes and max(per_master.values()) <= total / 2, per_master
    check = rl.verify(cluster.url, "m", connector_options=OPTS)
    assert not check.failures and check.chunks == published.chunks

    with rl.open_connector(cluster.url, **OPTS) as conn:
        old = [k for k in conn.list(f"m/{published.version}/")]
        assert len(old) >= published.chunks and len(conn.nodes_of(old)) == 3, "list scans every master"
        _publish(cluster, ckpt)  # a new version; the old one retired
        swept = rl.gc(cluster.url, "m", grace_s=0, connector_options=OPTS)
        assert swept["deleted"] == [f"m/{published.version}/"] and swept["objects"] == len(old)
        assert not any(conn.stat_many(old)), "gc deleted the old version on every master"


def test_load_shard_at_tp2_is_exact(cluster, published, ckpt):
    shards = [rl.load_shard("m", cluster.url, 2, r, device="cpu", connector_options=OPTS) for r in range(2)]
    assert_shards_match(original_tensors(ckpt), [(s.tensors, s.metadata) for s in shards])
    assert all(s.report.digest == s.report.expected_digest for s in shards)


def test_load_across_cluster_at_tp2_through_ray_is_exact(ray_session, cluster, published, ckpt):
    with rl.load_across_cluster(
        "m", cluster.url, tp=2, progress=False, ray_address="local", connector_options=OPTS
    ) as loaded:
        assert loaded.report.verified
        shards = [(loaded.state_dict(r), loaded.metadata(r)) for r in range(2)]
    assert_shards_match(original_tensors(ckpt), shards)


def test_auth_and_database_behave_as_for_one_server(cluster, published):
    with rl.open_connector(cluster.url, password="wrong") as conn:
        with pytest.raises(BackendError, match="authentication failed for user 'loader'") as info:
            conn.read("m/manifest.json")
        assert "wrong" not in str(info.value)
    with rl.open_connector(cluster.url.replace("/0", "/2"), **OPTS) as conn:
        with pytest.raises(ConfigError, match="names database 2.*only database 0"):
            conn.read("m/manifest.json")


def test_ask_during_a_slot_migration_then_moved_after_it(cluster, published):
    """A chunk's slot being migrated: its old master answers ASK for the moved key and the read follows it (ASKING on
    the importing master); once the slot is handed over, the connector's stale map meets MOVED, re-reads the map and
    reads the key from its new master."""
    from redis.crc import key_slot

    with rl.open_connector(cluster.url, **OPTS) as conn:
        manifest = read_manifest(conn, "m")
        key = sorted(conn.list(f"m/{manifest.version}/"))[0]
        want = conn.read(key)
        (source,) = conn.nodes_of([key])
        target = next(m for m in conn.masters() if m != source)
        slot = key_slot(key.encode())
        src, dst = cluster.node(source).client(), cluster.node(target).client()
        src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        assert src.execute_command("MIGRATE", "127.0.0.1", cluster.node(target).port, key, 0, 5000) in (b"OK", "OK")
        buf = bytearray(len(want))
        asked = conn.traffic.get(target, [0, 0])[0]
        conn.readinto(key, 0, memoryview(buf))  # the source answers ASK; the read follows it to the target
        assert conn.traffic[target][0] == asked + 1, "the read went to the importing master"
        assert bytes(buf) == want and conn.nodes_of([key]) == {source: [key]}, "ASK leaves the slot map as it was"
        for name in cluster.masters():
            cluster.node(name).client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        buf = bytearray(len(want))
        conn.readinto(key, 0, memoryview(buf))  # the stale map sends it to the source: MOVED, map re-read
        assert bytes(buf) == want and conn.nodes_of([key]) == {target: [key]}
    assert dst.execute_command("WAIT", 1, 5000) == 1
    check = rl.verify(cluster.url, "m", connector_options=OPTS)
    assert not check.failures


def test_tls_cluster_through_a_rediss_url(tmp_path, tls_files):
    """``rediss://`` of one node of a TLS-only cluster (3 masters): the slot map names each node's TLS port, every
    master is reached over TLS with the URL's CA; without the CA it is the certificate error of one server."""
    nodes = []
    try:
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            args = (*NODE_ARGS, "--tls-cluster", "yes", "--tls-replication", "yes")
            nodes.append(RedisServer(port=_cluster_port(), workdir=tmp_path / str(i), extra_args=args, tls=tls_files))
            nodes[-1].start()
        subprocess.run(
            ["redis-cli", "--tls", "--cacert", str(tls_files.cert), "--cluster", "create",
             *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        url = nodes[0].url
        wait_until(Cluster(nodes).state_ok, 20, "cluster_state:ok on every node", step=0.1)
        with rl.open_connector(url) as conn:
            keys = [f"t/{i}" for i in range(60)]
            conn.write_many([(k, k.encode() * 100) for k in keys])
            assert len(conn.nodes_of(keys)) == 3 and sorted(conn.masters()) == sorted(
                f"127.0.0.1:{n.port}" for n in nodes
            )
            bufs = {k: bytearray(len(k) * 100) for k in keys}
            conn.readinto_many([rl.connectors.ReadRequest(k, 0, memoryview(b)) for k, b in bufs.items()])
            assert all(bytes(b) == k.encode() * 100 for k, b in bufs.items())
            assert sorted(conn.list("t/")) == sorted(keys)
        with rl.open_connector(url.split("?")[0]) as conn, pytest.raises(BackendError, match="certificate"):
            conn.read("t/0")
    finally:
        for node in nodes:
            node.stop()


def test_eviction_check_covers_every_master(cluster, published):
    """A master that may evict keys is named by the check publish runs (the others are quiet)."""
    masters = cluster.masters()
    evicting = cluster.node(masters[-1]).client()
    evicting.config_set("maxmemory", str(1 << 30))
    evicting.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with rl.open_connector(cluster.url, **OPTS) as conn:
            warning = conn.check_eviction_policy()
        assert warning and f"node {masters[-1]})" in warning and "allkeys-lru" in warning, warning
        assert not any(f"node {m})" in warning for m in masters[:-1]), warning
    finally:
        evicting.config_set("maxmemory-policy", "noeviction")
        evicting.config_set("maxmemory", "0")


def test_failover_during_a_load_then_the_next_load_verifies(cluster, published, ckpt):
    """A master (not the URL's node) dies mid-load; its replica is promoted within ~5 s. The load in flight either
    completes verified or fails with one clear error; the next load completes verified."""
    faulty.register_all()
    originals = original_tensors(ckpt)
    seed = f"127.0.0.1:{cluster.nodes[0].port}"
    victim = next(m for m in cluster.masters() if m != seed)
    raw = manifest_raw(cluster.url, **OPTS)
    slow = with_query(f"redis://loader:{PW}@127.0.0.1:{cluster.nodes[0].port}/0", delay_ms=100, request_bytes=8192)
    ld = loader(slow, raw, 2, 0, retries={"attempts": 5, "deadline_s": 30})
    thread, box = run_in_thread(ld.load)
    wait_until(lambda: 0 < ld.progress()[0] or "error" in box, 20, "the first bytes to land")
    assert "error" not in box, box["error"]
    assert ld.progress()[0] < ld.progress()[1], "the kill lands in the middle of the load"
    cluster.node(victim).stop()
    thread.join(60)
    assert not thread.is_alive(), "the load across the failover must end, not hang"
    if "error" in box:
        assert isinstance(box["error"], BackendError), repr(box["error"])
        assert PW not in str(box["error"]) and "Redis" in str(box["error"]), box["error"]
    else:
        report = box["value"]
        assert not report.failures and report.digest == report.expected_digest
        assert_rank_matches(originals, ld.tensors, ld.metadata())
    print(f"\nload across the failover of {victim}: {box.get('error') or 'completed verified'}")
    ld.close()
    wait_until(lambda: cluster.state_ok() and victim not in cluster.masters(), 30, "the replica's promotion")
    assert len(cluster.masters()) == 3
    shard = rl.load_shard("m", cluster.url, 2, 1, device="cpu", connector_options=OPTS)
    assert shard.report.digest == shard.report.expected_digest
    assert_rank_matches(originals, shard.tensors, shard.metadata)
