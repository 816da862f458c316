"""Replicas share one pull (issue 13): R copies of a TP group read the store once, and every rank of every copy is
verified against the manifest. The exchange itself runs in one process first (no Ray: several ReplicaShards hand
parts to each other), then on a local Ray against a real redis-server, moto's S3 and a directory."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

import raydist_loader as rl
from raydist_loader import connectors
from raydist_loader.cli import print_report
from raydist_loader.driver import replicas
from raydist_loader.errors import RaydistError, VerificationError
from raydist_loader.load import share
from raydist_loader.load.share import ReplicaShard, stripes
from raydist_loader.report import LoadReport, check_verified
from raydist_loader.store.manifest import Manifest
from raydist_loader.store.plan import make_plan
from raydist_loader.store.summary import human_bytes
from raydist_loader.store.versions import read_manifest_bytes
from raydist_loader.testing import faulty
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import assert_shards_match, expected_slice, original_tensors

# ~6.6 MB of bf16 weights: the manifest (read once by the driver) stays far below the 5% the byte count allows
MIDSIZE = dict(hidden_size=256, intermediate_size=512, vocab_size=4000)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("replicas") / "llama", dtype=torch.bfloat16, **MIDSIZE)


@pytest.fixture(scope="module")
def original(ckpt):
    return original_tensors(ckpt)


def fresh_redis(server) -> str:
    server.start()
    with server.client() as client:
        client.flushdb()
    return server.url


def sent_by(server) -> int:
    """Bytes the redis-server has sent to all its clients so far (``INFO stats``)."""
    with server.client() as client:
        return int(client.info("stats")["total_net_output_bytes"])


def one_copy(url: str, tp: int) -> int:
    """What one replica reads from the store at ``tp`` (every rank's plan), the model once."""
    with rl.open_connector(url) as conn:
        manifest = Manifest.from_json(read_manifest_bytes(conn, "m")[1])
    return sum(make_plan(manifest, tp, r).bytes_read for r in range(tp))


def manifest_bytes(url: str) -> bytes:
    with rl.open_connector(url) as conn:
        return read_manifest_bytes(conn, "m")[1]


def assert_rank_matches(original, tensors, metadata):
    for name, full in original.items():
        assert torch.equal(tensors[name], expected_slice(full, metadata[name])), name


# --------------------------------------------------------------------------------------------- the cut (pure)
def test_stripes_give_every_chunk_to_exactly_one_replica_in_balanced_contiguous_parts(tmp_path, ckpt):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=4)
    manifest = Manifest.from_json(manifest_bytes(url))
    for tp, count in ((1, 2), (2, 3), (2, 5)):
        plan = make_plan(manifest, tp, tp - 1)
        cut = stripes(plan, count, part_bytes=256 << 10)
        owned = [i for stripe in cut for part in stripe for i in part]
        assert sorted(owned) == [i for i, r in enumerate(plan.reads) if r.nbytes], "each chunk read exactly once"
        assert all(sorted(i for part in stripe for i in part) == [i for part in stripe for i in part] for stripe in cut)
        sizes = [sum(plan.reads[i].nbytes for part in stripe for i in part) for stripe in cut]
        biggest = max(r.nbytes for r in plan.reads)
        assert max(sizes) - min(sizes) <= 2 * biggest, (tp, count, sizes)
        assert all(sum(plan.reads[i].nbytes for i in part) < (256 << 10) + biggest for s in cut for part in s)
        column_blocks = {r.tensor for r in plan.reads if not r.direct}
        for tensor in column_blocks:  # a tensor's column blocks travel together
            owners = {k for k, stripe in enumerate(cut) for part in stripe for i in part
                      if plan.reads[i].tensor == tensor}
            assert len(owners) == 1


# --------------------------------------------------------------------------------------------- in one process
def exchange(loaders: list[ReplicaShard], tamper=None) -> list:
    """What the Ray exchange does, in this process: each replica pulls and exports its parts, every other one takes
    them; then every replica completes. ``tamper(owner, part, arrays)`` may change what is handed over."""
    for owner, ld in enumerate(loaders):
        for part in range(ld.parts()):
            ld.pull_part(part)
            arrays = [a.copy() for a in ld.export_part(part)]
            if tamper:
                tamper(owner, part, arrays)
            for peer in loaders:
                if peer is not ld:
                    peer.take_part(owner, part, [np.frombuffer(a.tobytes(), dtype=np.uint8) for a in arrays])
    return [ld.complete() for ld in loaders]


@pytest.mark.parametrize("layout", ["chunked", "in_place"])
def test_three_replicas_in_one_process_read_the_store_once(redis_server, tmp_path, ckpt, original, layout, capsys):
    """tp=2 of a max_tp=4 store: rank 1 holds row-parallel column blocks too; in place, strided spans."""
    if layout == "chunked":
        url = fresh_redis(redis_server)
        rl.publish(ckpt, url, "m", max_tp=4)
    else:
        import shutil

        shutil.copytree(ckpt, tmp_path / "store" / "m")
        url = f"file://{tmp_path}/store"
        rl.index(url, "m", max_tp=4)
    raw = manifest_bytes(url)
    before = sent_by(redis_server) if layout == "chunked" else 0
    loaders = [ReplicaShard(url, raw, 2, 1, device="cpu", replica=i, replicas=3, part_bytes=300 << 10)
               for i in range(3)]
    reports = exchange(loaders)
    plan = loaders[0].plan
    assert any(not r.direct for r in plan.reads), "column blocks travel too"
    assert layout == "chunked" or any(r.extract for r in plan.reads), "and chunks cut out of strided spans"
    assert sum(ld.parts() for ld in loaders) > 3, "several parts per stripe"
    assert [r.replica for r in reports] == [0, 1, 2]
    assert sum(r.bytes_read for r in reports) == plan.bytes_read, "the store was read once"
    assert all(r.bytes_read + r.bytes_from_peers >= r.bytes for r in reports)
    if layout == "chunked":
        assert sent_by(redis_server) - before <= 1.05 * plan.bytes_read
    for ld, report in zip(loaders, reports, strict=True):
        assert not report.failures and report.repulled == 0 and report.digest == report.expected_digest
        assert_rank_matches(original, ld.tensors, ld.metadata())
        ld.close()
    if layout == "chunked":  # what `raydist-loader load` prints for such a load
        print_report(LoadReport.gather(reports, 1.0, True))
        lines = capsys.readouterr().out.splitlines()
        assert "tp=2 x 3 replicas" in lines[0] and lines[1].split()[:2] == ["replica", "rank"]
        assert [line.split()[:2] for line in lines[2:5]] == [["0", "1"], ["1", "1"], ["2", "1"]]
        assert f"the store sent {human_bytes(plan.bytes_read)}, the replicas shared" in lines[-1]


def test_a_wrong_byte_from_a_peer_is_re_pulled_from_the_store_by_the_receiver(tmp_path, ckpt, original):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    raw = manifest_bytes(url)

    def flip(owner, part, arrays):
        if owner == 0 and part == 0:
            arrays[0][7] ^= 0x01

    loaders = [ReplicaShard(url, raw, 2, 0, device="cpu", replica=i, replicas=2) for i in range(2)]
    reports = exchange(loaders, flip)
    assert [r.repulled for r in reports] == [0, 1], "only the receiver re-pulls, one chunk"
    for ld, report in zip(loaders, reports, strict=True):
        assert report.verified
        assert_rank_matches(original, ld.tensors, ld.metadata())

    # the store itself is wrong for a chunk replica 1 read: after its one re-pull each replica names itself
    manifest = Manifest.from_json(raw)
    read = loaders[1].plan.reads[loaders[1].stripes[1][0][0]]
    name = loaders[1].plan.tensors[read.tensor].name
    key = next(c for c in manifest.chunks(name) if c.id == read.chunk).parts[0]
    with rl.open_connector(url) as conn:
        data = bytearray(conn.read(key.object))
        data[key.offset] ^= 0xFF
        conn.write(key.object, bytes(data))
    loaders = [ReplicaShard(url, raw, 2, 0, device="cpu", replica=i, replicas=2) for i in range(2)]
    reports = exchange(loaders)
    with pytest.raises(VerificationError, match=rf"replica 0 rank 0: tensor {name} chunk {read.chunk}") as info:
        check_verified("m", reports)
    assert {(f["replica"], f["rank"], f["tensor"], f["chunk"]) for f in info.value.failures} == {
        (0, 0, name, read.chunk), (1, 0, name, read.chunk)
    }


# --------------------------------------------------------------------------------------------- on Ray
class CorruptingActor(replicas.ReplicaActor):
    """Replica 0 flips one byte of every part it shares (after verifying its own copy)."""

    def export_part(self, part: int) -> list[np.ndarray]:
        arrays = super().export_part(part)
        if self.replica == 0:
            arrays = [a.copy() for a in arrays]
            arrays[0][3] ^= 0x10
        return arrays


@pytest.fixture(scope="module")
def ray_session(redis_server, s3_server):
    """One local Ray for the module; workers register faulty+ and can unpickle this module's actor class."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    hook = {"worker_process_setup_hook": "raydist_loader.testing.faulty.register_all"}
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False, runtime_env=hook)
    yield ray
    ray.shutdown()


def assert_nothing_left(ray) -> None:
    """No placement group, no live actor and no object of ours in the object store after a load."""
    from ray._private.internal_api import memory_summary

    deadline = time.monotonic() + 15
    while True:
        groups = ray.util.placement_group_table().values()
        alive = [a for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        objects = int(summary.split("Plasma memory usage")[1].split(",")[1].split()[0])
        if all(g["state"] == "REMOVED" for g in groups) and not alive and objects == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {len(alive)} actors, {objects} objects, groups {list(groups)}")
        time.sleep(0.2)


def shards_of(loaded, replica: int, tp: int):
    view = loaded.replica(replica)
    return [(view.state_dict(r), view.metadata(r)) for r in range(tp)]


@pytest.mark.ray
def test_two_replicas_from_redis_read_the_store_once_and_verify_both(ray_session, redis_server, ckpt, original,
                                                                     monkeypatch):
    url = fresh_redis(redis_server)
    rl.publish(ckpt, url, "m", max_tp=2)
    copy = one_copy(url, 2)
    before = sent_by(redis_server)
    plain = [rl.load_shard("m", url, 2, rank, device="cpu") for rank in range(2)]  # a plain load, in this process
    assert sent_by(redis_server) - before >= copy, "one plain replica reads the model once"

    monkeypatch.setattr(share, "PART_BYTES", 512 << 10)  # several parts per stripe: the pipeline and its bound
    before = sent_by(redis_server)
    with rl.load_across_cluster("m", url, tp=2, replicas=2, progress=False) as loaded:
        sent = sent_by(redis_server) - before
        report = loaded.report
        assert sent <= 1.05 * copy, f"the store sent {sent} bytes for two replicas; one copy is {copy}"
        assert report.verified and report.replicas == 2 and loaded.replicas == 2
        assert loaded.replica(1)._coordinator.call(0, "parts") > 1, "several parts per stripe"
        assert [(r.replica, r.rank) for r in report.ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert report.total.bytes_read == copy and report.total.bytes_from_peers == copy
        assert all(r.digest == r.expected_digest == plain[r.rank].report.digest for r in report.ranks)
        for replica in range(2):
            shards = shards_of(loaded, replica, 2)
            assert_shards_match(original, shards)
            for (tensors, _), same in zip(shards, plain, strict=True):
                assert all(torch.equal(tensors[k], same.tensors[k]) for k in same.tensors), "as a plain load"
        assert loaded.run(lambda rank, tensors, x: (rank, len(tensors), x), 7) == [(r, len(original), 7)
                                                                                   for _ in range(2) for r in range(2)]
        assert loaded.replica(1).run(lambda rank, tensors: rank) == [0, 1]
        with pytest.raises(IndexError, match="replicas=2"):
            loaded.replica(2)
    assert_nothing_left(ray_session)


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["s3", "file"])
def test_two_replicas_from_s3_and_files(ray_session, s3_server, tmp_path, ckpt, original, backend):
    url = f"s3://{s3_server.make_bucket(f'replicas-{time.time_ns()}')}/store" if backend == "s3" else \
        f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    with rl.load_across_cluster("m", url, tp=2, replicas=2, progress=False) as loaded:
        report = loaded.report
        assert report.verified and report.total.bytes_read == one_copy(url, 2)
        assert all(r.bytes_from_peers > 0 and r.bytes_read > 0 for r in report.ranks), "each reads, each receives"
        for replica in range(2):
            assert_shards_match(original, shards_of(loaded, replica, 2))
    assert_nothing_left(ray_session)


@pytest.mark.ray
def test_a_corrupted_peer_is_healed_by_the_receivers_re_pull(ray_session, redis_server, ckpt, original,
                                                             monkeypatch):
    url = fresh_redis(redis_server)
    rl.publish(ckpt, url, "m", max_tp=2)
    monkeypatch.setattr(replicas, "ReplicaActor", CorruptingActor)
    with rl.load_across_cluster("m", url, tp=2, replicas=2, progress=False) as loaded:
        report = loaded.report
        assert report.verified
        assert [r.repulled > 0 for r in report.ranks] == [False, False, True, True], "replica 1 re-pulled"
        assert all(r.digest == r.expected_digest for r in report.ranks)
        assert_shards_match(original, shards_of(loaded, 1, 2))
    assert_nothing_left(ray_session)


@pytest.mark.ray
def test_an_actor_killed_mid_load_is_restarted_or_gives_one_clear_error(ray_session, redis_server, ckpt, original,
                                                                       monkeypatch):
    import threading

    ray = ray_session
    url = fresh_redis(redis_server)
    rl.publish(ckpt, url, "m", max_tp=2)
    slow = f"faulty+{url}?delay_ms=150&request_bytes=65536"
    monkeypatch.setattr(connectors, "_registered", dict(connectors._registered))  # faulty+ here, for this test
    faulty.FaultyConnector.register()
    monkeypatch.setattr(share, "PART_BYTES", 512 << 10)

    def load_killing(max_restarts: int):
        box: dict = {}

        def target():
            try:
                box["loaded"] = rl.load_across_cluster("m", slow, tp=2, replicas=2, progress=False, hold=True,
                                                       max_restarts=max_restarts)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                box["error"] = e

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        victim = _mid_pull(ray, "raydist:m#1:0")
        ray.kill(victim, no_restart=True)
        thread.join(90)
        assert not thread.is_alive()
        return box

    box = load_killing(max_restarts=1)
    assert "error" not in box, box.get("error")
    with box["loaded"] as loaded:
        report = loaded.report
        assert report.verified and [r.restarts for r in report.ranks] == [0, 0, 1, 0]
        for replica in range(2):
            assert_shards_match(original, shards_of(loaded, replica, 2))
        assert loaded.names == ["raydist:m:0", "raydist:m:1", "raydist:m#1:0", "raydist:m#1:1"]
        assert rl.release("m") == loaded.names, "release ends every replica of a held model"
        assert loaded.hold(poll_s=0.1), "hold returns once the actors were released elsewhere"
    assert_nothing_left(ray)

    box = load_killing(max_restarts=0)
    assert isinstance(box.get("error"), RaydistError), box
    assert "replica 1 rank 0 failed: its actor died" in str(box["error"]), box["error"]
    assert "max_restarts=0 is exhausted" in str(box["error"])
    assert_nothing_left(ray)


def _mid_pull(ray, name: str, timeout: float = 60.0):
    """The named actor once it has landed some but not all of its shard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            handle = ray.get_actor(name, namespace="raydist")
            got, total = ray.get(handle.progress.remote(), timeout=5)
            if 0 < got < total:
                return handle
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"{name} never was mid-pull")
