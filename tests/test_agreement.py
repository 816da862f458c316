"""One version per engine, engine-neutral (raydist_loader.engines.agreement): two ranks as threads over a group
that broadcasts and gathers like an engine's CPU process group, on a real directory store. The engines' own tests
(test_vllm.py, test_sglang.py) race real vLLM and SGLang ranks; these cover the failure paths: whatever fails on
one rank fails on every rank, and no rank is left waiting in a collective."""

from __future__ import annotations

import threading

import pytest
import torch

import raydist_loader as rl
from raydist_loader.engines import agreement
from raydist_loader.engines.agreement import agree_version, on_every_rank
from raydist_loader.engines.handoff import EngineOptions
from raydist_loader.errors import ConfigError, RaydistError

from .shards import original_tensors

NORM = "model.norm.weight"


class Threads:
    """The group of ``size`` thread ranks: each collective is a barrier round over shared slots."""

    def __init__(self, size: int):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size, timeout=30)

    def rank(self, r: int) -> Rank:
        return Rank(self, r)


class Rank:
    def __init__(self, group: Threads, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def gather(self, obj):
        self.group.slots[self.rank] = obj
        self.group.barrier.wait()
        out = list(self.group.slots)
        self.group.barrier.wait()
        return out

    def broadcast(self, obj):
        return self.gather(obj)[0]


def _ranks(size: int, body) -> list:
    """``body(rank)`` on ``size`` thread ranks; each rank's return value or exception."""
    group, out = Threads(size), [None] * size

    def run(r: int) -> None:
        try:
            out[r] = body(group.rank(r))
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank was left waiting in a collective"
    return out


@pytest.fixture
def store(tmp_path, two_llamas):
    url = f"file://{tmp_path}/store"
    v1 = rl.publish(two_llamas[0], url, "m", max_tp=2).version
    yield url, v1
    for lease in agreement._serving:
        lease.release()
    agreement._serving.clear()


def _options(url: str, **more) -> EngineOptions:
    return EngineOptions.parse({"url": url, "model": "m", **more}, "extra")


def _load(options: EngineOptions, rank, version):
    shard = rl.load_shard(options.model, options.url, 2, rank.rank, device="cpu", model_version=version.version,
                          manifest_sha256=version.manifest_sha256)
    return shard, shard.report


def test_every_rank_loads_the_version_rank_0_resolved_though_a_publish_lands_between(store, two_llamas):
    url, v1 = store
    published = threading.Event()

    def body(rank):
        options, agreed = agree_version(rank, "test engine", lambda: _options(url))
        if rank.rank == 0:
            rl.publish(two_llamas[1], url, "m", max_tp=2)  # lands before rank 1 reads anything
            published.set()
        published.wait(30)
        return on_every_rank(options, rank, agreed, "load", lambda: _load(options, rank, agreed.ref))

    shards = _ranks(2, body)
    assert [s.report.version for s in shards] == [v1, v1]
    assert torch.equal(shards[0].tensors[NORM], original_tensors(two_llamas[0])[NORM])
    leased = [v for v in rl.versions(url, "m") if v["leases"]]
    assert [(v["version"], v["leases"][0]["holder"]) for v in leased] == [(v1, "test engine")]


def test_options_that_fail_on_one_rank_fail_on_every_rank(store):
    url, _ = store

    def body(rank):
        def options():
            if rank.rank == 1:
                raise ConfigError("DIR/raydist.json does not exist on this node")
            return _options(url)

        return agree_version(rank, "test engine", options)

    errors = _ranks(2, body)
    assert all(isinstance(e, RaydistError) for e in errors), errors
    assert all("rank 1: ConfigError: DIR/raydist.json does not exist on this node" in str(e) for e in errors)
    assert isinstance(errors[1], ConfigError), "the failing rank raises its own kind"


def test_a_version_rank_0_cannot_resolve_fails_every_rank_and_leaves_no_lease(store):
    url, _ = store
    missing = "v20200101000000000-00000000"
    errors = _ranks(2, lambda rank: agree_version(rank, "test engine", lambda: _options(url, model_version=missing)))
    assert all(isinstance(e, RaydistError) and "does not exist" in str(e) for e in errors), errors
    assert "rank 0 of this engine could not resolve" in str(errors[1])
    assert not any(v["leases"] for v in rl.versions(url, "m"))


def test_a_rank_that_fails_or_loads_another_version_fails_every_rank(store, two_llamas):
    url, v1 = store
    v2 = rl.publish(two_llamas[1], url, "m", max_tp=2).version

    def body(rank):
        options, agreed = agree_version(rank, "test engine", lambda: _options(url))

        def work():
            if rank.rank == 1:  # as an unsynchronised rank would: the current version, on its own
                shard = rl.load_shard("m", url, 2, 1, device="cpu", model_version=v1)
                return shard, shard.report
            return _load(options, rank, agreed.ref)

        return on_every_rank(options, rank, agreed, "update", work)

    errors = _ranks(2, body)
    assert all(isinstance(e, RaydistError) for e in errors), errors
    assert all(f"update of 'm' version {v2} refused on every rank" in str(e) and f"rank 1: loaded version {v1}"
               in str(e) for e in errors)
