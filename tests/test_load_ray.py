"""load_across_cluster on a local Ray with logical GPUs, from a directory, a real redis-server and moto's S3."""

from __future__ import annotations

import time

import pytest
import ray
import torch

import raydist_loader as rl
from raydist_loader.errors import ConfigError, PlacementError, ShardingError, VerificationError
from raydist_loader.store.versions import read_manifest
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import assert_shards_match, original_tensors

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session(redis_server, s3_server):
    """One local Ray per module (S3 credentials and endpoint are in the environment before workers start)."""
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ray") / "llama", dtype=torch.bfloat16)


def _load_and_check(url, ckpt, tp, **kw):
    with rl.load_across_cluster("m", url, tp=tp, progress=False, **kw) as loaded:
        report = loaded.report
        shards = [(loaded.state_dict(r), loaded.metadata(r)) for r in range(tp)]
        assert_shards_match(original_tensors(ckpt), shards)
        return report, loaded.run(lambda rank, tensors, k: (rank, len(tensors), k), "x")


@pytest.mark.parametrize("tp", [1, 2])
def test_load_verifies_on_every_backend(ray_session, store_url, ckpt, tp):
    rl.publish(ckpt, store_url, "m", max_tp=2)
    report, ran = _load_and_check(store_url, ckpt, tp)
    assert report.verified and [r.rank for r in report.ranks] == list(range(tp))
    assert all(r.digest == r.expected_digest and r.bytes == r.bytes_read for r in report.ranks)
    assert report.total.bytes == sum(r.bytes for r in report.ranks) > 0
    assert ran == [(r, len(original_tensors(ckpt)), "x") for r in range(tp)]
    _check_phases(report)


def _check_phases(report) -> None:
    """Every phase of the time to ready is reported, in order, inside the call; the manifest comes first (bad input
    is refused before Ray starts); start-up ends where the pull begins."""
    phases = {p.name: p for p in report.phases}
    assert list(phases) == ["manifest", "connect", "placement", "actors", "pull", "verify"]
    assert all(0 <= p.start_s <= p.end_s <= report.total.call_to_verified_s + 1e-6 for p in report.phases)
    assert phases["manifest"].start_s == 0.0 <= phases["connect"].start_s, "the manifest is read first"
    assert phases["placement"].end_s <= phases["actors"].end_s == pytest.approx(report.total.time_to_ready_s)
    assert phases["pull"].end_s <= phases["verify"].end_s == pytest.approx(report.total.call_to_verified_s)
    assert all({"pull_s", "verify_s"} <= set(r.phases) for r in report.ranks)


def test_gpu_bundles_when_the_cluster_has_gpus(ray_session, tmp_path, ckpt):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    report, _ = _load_and_check(url, ckpt, 2, device="auto")
    gpus = [r.gpu_ids for r in report.ranks]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1], "one logical GPU per rank"
    assert all(r.device == "cpu" for r in report.ranks), "logical GPUs have no CUDA device"
    report, _ = _load_and_check(url, ckpt, 2, device="cpu")
    assert all(r.gpu_ids == [] for r in report.ranks)


def test_in_place_checkpoint_loads_and_reports_bytes_read_vs_kept(ray_session, tmp_path, ckpt):
    import shutil

    shutil.copytree(ckpt, tmp_path / "store" / "m")
    rl.index(f"file://{tmp_path}/store", "m", max_tp=2)
    report, _ = _load_and_check(f"file://{tmp_path}/store", ckpt, 2)
    assert all(r.bytes_read > r.bytes for r in report.ranks)


def test_corrupted_chunk_raises_naming_rank_tensor_chunk(ray_session, redis_server, ckpt):
    url = redis_server.url
    redis_server.client().flushdb()
    rl.publish(ckpt, url, "m", max_tp=2)
    with rl.open_connector(url) as conn:
        manifest = read_manifest(conn, "m")
        name = "model.layers.1.self_attn.v_proj.weight"
        chunk = manifest.chunks(name)[1]  # kept by rank 1 at tp=2
        key = chunk.parts[0].object
        data = bytearray(conn.read(key))
        data[5] ^= 0xFF
        conn.write(key, bytes(data))
    with pytest.raises(VerificationError, match=rf"rank 1: tensor {name} chunk {chunk.id}") as info:
        rl.load_across_cluster("m", url, tp=2, progress=False)
    assert info.value.failures[0]["rank"] == 1
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    ), "a failed load leaves no placement group behind"


def test_unmet_placement_times_out_with_resources(ray_session, tmp_path, ckpt):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    with pytest.raises(PlacementError, match=r"STRICT_SPREAD.*cluster has \{CPU: 2, GPU: 4\}"):
        rl.load_across_cluster("m", url, tp=2, placement="strict_spread", placement_timeout_s=3, progress=False)
    assert ray.available_resources().get("CPU") == 2, "the timed-out placement group was removed"
    # placed, but the actors (importing torch) cannot be up within their own start-up timeout
    with pytest.raises(PlacementError, match=r"did not start within 0.01s.*--actor-start-timeout-s"):
        rl.load_across_cluster("m", url, tp=2, actor_start_timeout_s=0.01, progress=False)
    deadline = time.monotonic() + 10  # the resource view lags the removal a little
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2, "the actors and their placement group were removed"


def test_refusals_before_any_actor_starts(ray_session, tmp_path, ckpt):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    with pytest.raises(ShardingError, match=r"tp=4.*serves tp in \[1, 2\]"):
        rl.load_across_cluster("m", url, tp=4, progress=False)
    with pytest.raises(VerificationError, match="not the expected"):
        rl.load_across_cluster("m", url, tp=2, expect_manifest_sha256="0" * 64, progress=False)
    with pytest.raises(ConfigError, match=r"placement: got 'spreaded'; expected 'pack', 'spread'"):
        rl.load_across_cluster("m", url, tp=2, placement="spreaded", progress=False)
    with pytest.raises(ConfigError, match="re-publish"):
        rl.load_across_cluster("m", url, tp=2, rules={"default": "replicate", "rules": []}, progress=False)
    pinned = rl.manifest_sha256(url, "m")
    with rl.load_across_cluster("m", url, tp=2, expect_manifest_sha256=pinned, progress=False) as loaded:
        assert loaded.report.verified


def test_tp_forward_through_ray_equals_the_full_model(ray_session, tmp_path):
    """The engine hand-off: each actor computes its partials next to its shard; their sums give the model's logits."""
    from ray import cloudpickle

    from .shards import load_example, rerandomise

    tp_llama = load_example()
    cloudpickle.register_pickle_by_value(tp_llama)  # examples/ is not importable inside the actors
    ckpt = make_tiny_checkpoint("llama", tmp_path / "fp32", dtype=torch.float32)
    rerandomise(ckpt, seed=3)
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=4)
    ids = torch.tensor([[0, 63, 64, 200, 249, 17]])
    reference = tp_llama.reference_forward(ckpt, ids)
    config = __import__("json").loads((ckpt / "config.json").read_text())
    for tp in (2, 4):
        with rl.load_across_cluster("m", url, tp=tp, progress=False) as loaded:
            metas = [loaded.metadata(r) for r in range(tp)]
            logits = tp_llama.tp_forward(loaded.run, metas, config, ids)
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_many_tensor_moe_loads_at_tp4_as_vllm_cuts_it(ray_session, many_tensor_moe):
    """18,867 tensors: the driver parses and plans once, each actor gets its plan; every rank holds vLLM's cut
    (checked next to each shard against the checkpoint file)."""
    from ray import cloudpickle

    from . import shards

    cloudpickle.register_pickle_by_value(shards)  # tests/ is not importable inside the actors
    ckpt, url = many_tensor_moe
    with rl.load_across_cluster("moe", url, tp=4, progress=False) as loaded:
        assert loaded.report.verified and [r.rank for r in loaded.report.ranks] == [0, 1, 2, 3]
        assert loaded.run(shards.actor_vllm_cut_mismatches, str(ckpt), 4) == [[]] * 4
