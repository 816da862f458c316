"""Several simulated nodes (ray.cluster_utils.Cluster): PACK keeps a TP group on one node, SPREAD spreads it;
replicas spread one per node and share one pull between the nodes."""

from __future__ import annotations

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

import raydist_loader as rl
from raydist_loader.errors import PlacementError
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of 2 logical GPUs each (CPU 1 each, the actors ask for 0.25)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=1, num_gpus=2)
    c.wait_for_nodes()
    c.connect()  # the driver joins this simulated cluster (its own address), never a stale one
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", dtype=torch.bfloat16)
    url = f"file://{root}/store"  # one filesystem: every simulated node sees it
    rl.publish(ckpt, url, "m", max_tp=2)
    return url


def _nodes(report: dict) -> list[str]:
    return [r.node_id for r in report.ranks]


def _settle(timeout_s: float = 20.0) -> None:
    """Wait until the cluster's view shows every CPU and GPU free again: SPREAD is best effort and places on the
    nodes that look free, so a node still counted busy from the previous load would take both ranks elsewhere."""
    import time

    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources()
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= total[k] for k in ("CPU", "GPU")):
            return
        time.sleep(0.2)


@pytest.mark.parametrize(("placement", "distinct"), [("spread", 2), ("strict_spread", 2), ("pack", 1),
                                                      ("strict_pack", 1)])
def test_placement_strategies(cluster, store, placement, distinct):
    _settle()
    with rl.load_across_cluster("m", store, tp=2, placement=placement, progress=False) as loaded:
        report = loaded.report
    nodes = _nodes(report)
    assert report.verified and len(set(nodes)) == distinct, nodes
    assert nodes == sorted(nodes), "ranks are ordered by node"
    assert all(len(r.gpu_ids) == 1 for r in report.ranks)


def test_strict_pack_beyond_one_node_times_out_naming_resources(cluster, store):
    """Two bundles of 0.9 CPU cannot share a 1-CPU node: the error shows requested vs available resources."""
    with pytest.raises(PlacementError, match=r"STRICT_PACK.*cluster has \{CPU: 2, GPU: 4\}"):
        rl.load_across_cluster("m", store, tp=2, placement="strict_pack", placement_timeout_s=3, progress=False,
                               num_cpus_per_actor=0.9)
    assert ray.available_resources().get("GPU") == 4, "the placement group was removed"


@pytest.mark.parametrize(("tp", "replicas"), [(2, 2), (1, 3)])
def test_replicas_spread_one_per_node_and_share_across_nodes(cluster, store, tp, replicas):
    """Replicas go one per node while a node without one has room; the third of three (tp=1) then shares a node
    rather than wait. Each rank gets part of its shard from another node through Ray's object manager and
    verifies it."""
    _settle()
    with rl.load_across_cluster("m", store, tp=tp, replicas=replicas, progress=False) as loaded:
        report = loaded.report
        per_replica = [{r.node_id for r in report.replica(i)} for i in range(replicas)]
        assert report.verified and all(len(nodes) == 1 for nodes in per_replica), per_replica
        assert per_replica[0] != per_replica[1], "one replica per node"
        assert len(set.union(*per_replica)) == 2
        assert all(r.bytes_from_peers > 0 for r in report.ranks), "each rank got part of its shard from a peer"
        assert report.total.bytes_read == sum(r.bytes for r in report.replica(0)), "the store was read once"
        assert loaded.replica(1).metadata(0) == loaded.metadata(0)
