"""RL weight updates (UpdatePublisher): a trainer's steps published from memory as deltas, on a directory, a real
redis-server and moto's S3; every version loads exactly, cold loads read at most about 1.5x their shard, gc and
promote treat a chain as one, a damaged delta or a hostile manifest is refused, and an engine update builds the
chunks its parameters hold from those bytes and the deltas alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load_file

import raydist_loader as rl
from raydist_loader.connectors import open_connector
from raydist_loader.engines.handoff import EngineOptions, load_into, update_rank
from raydist_loader.errors import ManifestError, NotFoundError, VerificationError
from raydist_loader.store import deltas, versions
from raydist_loader.store.manifest import Manifest, version_prefix
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import assert_shards_match
from .test_stream import VllmLikeLlama

LR = 3e-6  # an RL learning rate for these weights (std 0.02): about 5% of the bf16 elements change per step


class Trainer:
    """fp32 master weights taking sign-like (Adam-like) steps; ``weights()`` are the bf16 tensors it serves."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        self.master = {k: v.float().clone() for k, v in state.items()}
        self.dtype, self.gen = dtype, torch.Generator().manual_seed(seed)
        self.served = self.weights()

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtype) for k, v in self.master.items()}

    def step(self, lr: float = LR, only: float | None = None) -> float:
        """One step (``only``: on that fraction of the elements); returns the fraction of served elements it
        changed."""
        for w in self.master.values():
            move = torch.randn(w.shape, generator=self.gen).sign_()
            if only is not None:
                move *= torch.rand(w.shape, generator=self.gen) < only
            w.add_(move, alpha=lr)
        new = self.weights()
        changed = sum(int((new[k] != self.served[k]).sum()) for k in new) / sum(v.numel() for v in new.values())
        self.served = new
        return changed


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama", dtype=torch.bfloat16)


@pytest.fixture
def trainer(llama) -> Trainer:
    return Trainer(load_file(llama / "model.safetensors"))


def _manifest(url: str, model: str, version: str | None = None) -> Manifest:
    with open_connector(url) as conn:
        return versions.read_manifest(conn, model, version)


def _check_loads(url: str, model: str, tensors: dict[str, torch.Tensor]) -> list:
    """Every rank at tp 1 and 2 equals ``tensors`` and verifies; returns the reports."""
    reports = []
    for tp in (1, 2):
        shards = [rl.load_shard(model, url, tp, rank, device="cpu") for rank in range(tp)]
        assert_shards_match(tensors, [(s.tensors, s.metadata) for s in shards])
        reports += [s.report for s in shards]
    assert rl.verify(url, model).ok
    return reports


# ------------------------------------------------------------------------------------------ the loop
def test_a_training_loop_publishes_deltas_and_every_version_loads_exactly(store_url, llama, trainer):
    pub = rl.UpdatePublisher(store_url, "rl", files_from=llama, max_tp=2, full_every=4)
    first = pub.publish(trainer.served)
    assert first.update["base"] is None and first.update["deltas"] == 0
    model_bytes, previous = first.bytes, first.version
    _check_loads(store_url, "rl", trainer.served)
    for step in range(1, 6):
        changed = trainer.step()
        assert 0.01 < changed < 0.08, changed
        result = pub.publish(trainer.served)
        assert result.current and result.update["base"] == previous and pub.version == result.version
        manifest = _manifest(store_url, "rl")
        if step % 4 == 0:  # full_every: every chunk stored whole again, the chain starts over
            assert result.update["whole"] == result.chunks and not manifest.chain, result.update
        else:
            assert result.update["deltas"] > 0 and result.update["unchanged"] > 0, result.update  # norms did not move
            assert result.update["bytes_written"] < 0.25 * model_bytes, result.update  # ~5% of elements changed
            assert 1 <= len(manifest.chain) <= 3 and all(v < manifest.version for v in manifest.chain)
        for report in _check_loads(store_url, "rl", trainer.served):
            assert report.bytes_read <= 1.5 * report.bytes + 1024, report  # the full chunks and their deltas
        previous = result.version
    listed = {v["version"]: v for v in rl.versions(store_url, "rl")}
    assert all(listed[v]["complete"] for v in manifest.chain)
    assert all("is built on it" in listed[v]["kept"] or listed[v]["kept"] == "the current version names its objects"
               for v in manifest.chain)


def test_unchanged_weights_are_a_version_of_no_chunk_bytes(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    pub.publish(trainer.served)
    again = pub.publish(trainer.served)
    assert again.update["unchanged"] == again.chunks and again.update["whole"] == again.update["deltas"] == 0
    with open_connector(url) as conn:
        written = list(conn.list(version_prefix("rl", again.version)))
    assert written == [f"{version_prefix('rl', again.version)}manifest.json"]
    _check_loads(url, "rl", trainer.served)


def test_full_every_and_the_delta_budget_store_whole_chunks(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    every = rl.UpdatePublisher(url, "every", files_from=llama, max_tp=2, full_every=1)
    budget = rl.UpdatePublisher(url, "budget", files_from=llama, max_tp=2, max_delta_fraction=1e-6)
    for pub in (every, budget):
        pub.publish(trainer.served)
    trainer.step()
    for pub, model in ((every, "every"), (budget, "budget")):
        result = pub.publish(trainer.served)
        assert result.update["deltas"] == 0 and result.update["whole"] > 0
        assert not _manifest(url, model).chain or model == "budget"  # unchanged chunks may stay where they were
        _check_loads(url, model, trainer.served)
    with pytest.raises(rl.ConfigError, match="full_every"):
        rl.UpdatePublisher(url, "x", full_every=0)


def test_a_publish_in_between_makes_the_next_version_whole(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    pub.publish(trainer.served)
    trainer.step()
    rl.publish_state_dict(trainer.served, url, "rl", max_tp=2)  # someone else
    trainer.step()
    result = pub.publish(trainer.served)
    assert result.update["base"] is None and result.update["whole"] == result.chunks
    _check_loads(url, "rl", trainer.served)
    trainer.step()
    assert pub.publish(trainer.served).update["base"] == result.version  # and it builds on its own again


def test_a_failed_publish_leaves_the_current_version_and_the_next_one_is_whole(tmp_path, llama, trainer,
                                                                               monkeypatch):
    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    first = pub.publish(trainer.served)
    served = {k: v.clone() for k, v in trainer.served.items()}
    trainer.step()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr("raydist_loader.store.updates._finish", broken)
        with pytest.raises(rl.BackendError, match="disk full"):
            pub.publish(trainer.served)
    assert _manifest(url, "rl").version == first.version
    _check_loads(url, "rl", served)
    result = pub.publish(trainer.served)
    assert result.update["base"] is None
    _check_loads(url, "rl", trainer.served)


# ------------------------------------------------------------------------------------------ gc, promote, damage
def test_gc_keeps_the_versions_a_kept_version_is_built_on(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    v1 = pub.publish(trainer.served).version
    trainer.step()
    v2 = pub.publish(trainer.served).version
    out = rl.gc(url, "rl", grace_s=0)
    assert f"rl/{v1}/" in out["kept"] and not out["deleted"]
    _check_loads(url, "rl", trainer.served)
    trainer.step()
    v3 = rl.publish_state_dict(trainer.served, url, "rl", max_tp=2).version  # whole: builds on nothing
    out = rl.gc(url, "rl", grace_s=0)
    assert sorted(out["deleted"]) == [f"rl/{v1}/", f"rl/{v2}/"] and out["current"] == v3
    _check_loads(url, "rl", trainer.served)


def _built_on_then_replaced(url: str, llama: Path, trainer: Trainer) -> tuple[str, str, dict[str, torch.Tensor]]:
    """v1 (whole), v2 (deltas of v1: built on it), then another publisher's whole v3 made current; returns v1, v2
    and v2's tensors."""
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    v1 = pub.publish(trainer.served).version
    trainer.step()
    v2 = pub.publish(trainer.served).version
    kept = {k: v.clone() for k, v in trainer.served.items()}
    trainer.step()
    rl.publish_state_dict(trainer.served, url, "rl", max_tp=2)
    return v1, v2, kept


def test_a_leased_version_keeps_its_chain_through_gc(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    v1, v2, kept = _built_on_then_replaced(url, llama, trainer)
    from raydist_loader.store.leases import Lease

    lease = Lease.take(url, "rl", v2, "test engine")
    try:
        out = rl.gc(url, "rl", grace_s=0)
        assert f"rl/{v1}/" in out["kept"] and "built on it" in out["reasons"][f"rl/{v1}/"]
        _check_loads_version(url, v2, kept)
    finally:
        lease.release()
    assert sorted(rl.gc(url, "rl", grace_s=0)["deleted"]) == [f"rl/{v1}/", f"rl/{v2}/"]


def _check_loads_version(url: str, version: str, tensors: dict[str, torch.Tensor]) -> None:
    shards = [rl.load_shard("rl", url, 2, r, device="cpu", model_version=version) for r in range(2)]
    assert_shards_match(tensors, [(s.tensors, s.metadata) for s in shards])


def test_promote_refuses_a_version_whose_chain_lost_an_object(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    v1, v2, _ = _built_on_then_replaced(url, llama, trainer)
    with open_connector(url) as conn:
        packed = next(k for k in conn.list(version_prefix("rl", v1)) if k.endswith(".safetensors"))
        conn.delete(packed)
    with pytest.raises(NotFoundError, match=f"version {v2} .* is incomplete"):
        rl.promote(url, "rl", v2)
    with pytest.raises(NotFoundError, match=packed.split("/")[-1]):
        rl.load_shard("rl", url, 1, 0, device="cpu", model_version=v2)


def test_a_damaged_delta_fails_verification_naming_the_chunk(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    pub.publish(trainer.served)
    trainer.step()
    v2 = pub.publish(trainer.served).version
    m = _manifest(url, "rl")
    name, t = next((n, t) for n, t in m.tensors.items() if t.delta and any(t.delta))
    index = next(i for i, steps in enumerate(t.delta) if steps)
    obj, offset, nbytes = t.delta[index][-3:]
    path = tmp_path / "store" / m.objects[obj]
    data = bytearray(path.read_bytes())
    data[offset + nbytes // 2] ^= 0x40
    path.write_bytes(bytes(data))
    chunk = m.grid_of(t)[index].id
    with pytest.raises(VerificationError, match=f"tensor {name} chunk {chunk}"):
        rl.load_shard("rl", url, 1, 0, device="cpu")
    result = rl.verify(url, "rl", model_version=v2)
    assert not result.ok and any(f["tensor"] == name and f["chunk"] == chunk for f in result.failures)


def test_hostile_chains_and_deltas_are_refused(tmp_path, llama, trainer):
    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    pub.publish(trainer.served)
    trainer.step()
    pub.publish(trainer.served)
    good = json.loads(_manifest(url, "rl").to_json())
    name = next(n for n, t in good["tensors"].items() if any(t.get("delta", [])))
    index = next(i for i, steps in enumerate(good["tensors"][name]["delta"]) if steps)

    def refused(edit, pattern: str) -> None:
        doc = json.loads(json.dumps(good))
        edit(doc)
        with pytest.raises(ManifestError, match=pattern):
            Manifest.from_json(json.dumps(doc))

    refused(lambda d: d.update(chain=["v29991231235959999-00000000"]), "chain.*older than")
    refused(lambda d: d.update(chain=[]), "outside rl/v")  # the base's objects are no longer allowed
    refused(lambda d: d["tensors"][name]["delta"][index].__setitem__(2, 1 << 40), "at most the chunk's own")
    refused(lambda d: d["tensors"][name]["delta"][index].__setitem__(0, 999), "object index outside")
    refused(lambda d: d["tensors"][name]["delta"][index].append(0), "triples")
    refused(lambda d: d["tensors"][name].__setitem__("delta", []), "entries for a chunk grid")
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ManifestError, match="decodes to 1048576 bytes, its chunk has 64"):
        deltas.apply(buf, zstandard.ZstdCompressor().compress(bytes(1 << 20)), "delta x")
    with pytest.raises(ManifestError, match="not a delta"):
        deltas.apply(buf, b"garbage!", "delta x")


# ------------------------------------------------------------------------------------------ an engine's update
def test_an_engine_update_reads_only_the_deltas_and_equals_the_new_version(store_url, tmp_path):
    """A model built as vLLM builds it (fused qkv/gate_up, row-parallel narrows, a cast, a clone: test_stream)
    serving v1 updates to v2 and v3: the chunks its parameters hold as plain copies are built from them and the
    deltas; what it cannot reuse (the cast, a parameter changed behind the loader's back) comes from the store;
    every parameter equals the same model loaded from the new weights."""
    ckpt = make_tiny_checkpoint("llama", tmp_path / "f32", dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    trainer = Trainer(load_file(ckpt / "model.safetensors"), dtype=torch.float32)
    pub = rl.UpdatePublisher(store_url, "rl", files_from=ckpt, max_tp=2)
    pub.publish(trainer.served)
    options = EngineOptions.parse({"url": store_url, "model": "rl"}, "extra")
    model = VllmLikeLlama(cfg, 2, 1)
    served = load_into(model, options, 2, 1).served
    assert served.places  # most chunks were read straight into the parameters
    for step in range(2):
        trainer.step(lr=1e-3, only=0.05)  # fp32 served: a step that moves 5% of the elements
        pub.publish(trainer.served)
        if step == 1:  # a parameter changed behind the loader's back: its chunks do not hash as served
            model.param("model.layers.0.mlp.gate_up_proj.weight").add_(1.0)
        update = update_rank(options, 2, 1, served=served)
        model.load_weights(update.weights)
        reference = VllmLikeLlama(cfg, 2, 1)
        reference.load_weights(trainer.served.items())
        assert all(torch.equal(model.param(n), reference.param(n)) for n in model.names)
        report = update.report
        assert report.verified and report.version == pub.version
        assert 0 < report.phases["reused_chunks"] < report.chunks
        assert report.bytes_read < 0.5 * report.bytes, report  # deltas, and the few chunks it could not reuse
        served = update.served


# ------------------------------------------------------------------------------------------ Ray, the example
def test_a_ray_load_of_a_version_built_from_deltas_with_replicas(tmp_path, llama, trainer):
    """The Ray path (actors, replicas sharing one read) loads a version made of deltas exactly, each rank reading
    its full chunks and their deltas once between the replicas."""
    import ray

    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2)
    pub.publish(trainer.served)
    trainer.step()
    pub.publish(trainer.served)
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with rl.load_across_cluster("rl", url, tp=2, replicas=2, progress=False) as loaded:
            report = loaded.report
            for i in range(2):
                group = loaded.replica(i)
                assert_shards_match(trainer.served, [(group.state_dict(r), group.metadata(r)) for r in range(2)])
    finally:
        ray.shutdown()
    assert report.verified and {r.version for r in report.ranks} == {pub.version}
    built = [rl.load_shard("rl", url, 2, r, device="cpu").report.bytes_read for r in range(2)]
    assert report.total.bytes_read == sum(built)  # the two replicas read each rank's bytes once between them


def test_the_rl_example_runs(tmp_path):
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "rl_updates.py"
    out = subprocess.run([sys.executable, str(example), f"file://{tmp_path}/store"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "as deltas" in out.stdout and "every version loaded and verified" in out.stdout


def test_several_processes_publish_one_version_of_deltas(store_url, llama, trainer):
    """Two parts (each its own publisher and tensors, as two trainer ranks after their gather) publish one version
    per step: the first whole, the next as deltas against it, merged by the last part in; each loads exactly."""
    names = sorted(trainer.served)
    halves = [names[0::2], names[1::2]]
    pubs = [rl.UpdatePublisher(store_url, "rl", max_tp=2) for _ in halves]
    previous = None
    for step in range(3):
        if step:
            trainer.step()
        token = rl.open_version(store_url, "rl", parts=2, files_from=llama, timeout_s=60)
        results = [pub.publish({k: trainer.served[k] for k in half}, token=token, part=i)
                   for i, (pub, half) in enumerate(zip(pubs, halves, strict=True))]
        assert [r.current for r in results] == [False, True]  # the last part in merged and swapped
        version = results[0].version
        assert all(r.version == version and p.version == version for r, p in zip(results, pubs, strict=True))
        manifest = _manifest(store_url, "rl")
        assert manifest.version == version
        if step == 0:
            assert all(r.update["base"] is None for r in results) and not manifest.chain
        else:
            assert all(r.update["base"] == previous and r.update["deltas"] > 0 for r in results), results
            assert manifest.chain == [previous] if step == 1 else previous in manifest.chain
        _check_loads(store_url, "rl", trainer.served)
        previous = version


# ------------------------------------------------------------------------------------------ review regressions
def test_a_tensor_that_moves_between_parts_is_stored_whole_by_the_part_that_gets_it_back(tmp_path, llama, trainer):
    """v1: lm_head in part 0; v2: in part 1 (changed); v3: back in part 0 with v1's bytes. Part 0's kept copy is
    v1's, not what the base (v2) stores: it must not be taken for unchanged, nor a delta made against it."""
    url, moved = f"file://{tmp_path}/store", "lm_head.weight"
    rest = [n for n in sorted(trainer.served) if n != moved]
    pubs = [rl.UpdatePublisher(url, "rl", max_tp=1) for _ in range(2)]

    def version(assign: list[list[str]], weights: dict) -> None:
        token = rl.open_version(url, "rl", parts=2, files_from=llama, timeout_s=60)
        for i, names in enumerate(assign):
            pubs[i].publish({k: weights[k] for k in names}, token=token, part=i)

    first = {k: v.clone() for k, v in trainer.served.items()}
    version([[*rest[0::2], moved], rest[1::2]], first)
    trainer.step(lr=1e-2)
    version([rest[0::2], [*rest[1::2], moved]], trainer.served)
    third = {**trainer.served, moved: first[moved].clone()}
    version([[*rest[0::2], moved], rest[1::2]], third)
    shard = rl.load_shard("rl", url, 1, 0, device="cpu")
    assert shard.report.verified and all(torch.equal(shard.tensors[k], v) for k, v in third.items())


def test_tensors_changing_while_a_publish_writes_do_not_drift_from_the_store(tmp_path, llama, trainer, monkeypatch):
    """An async RL step lands while whole chunks are written: what is stored (and kept for the next deltas) is what
    publish decided on, so the next version built on it loads exactly."""
    from raydist_loader.store import updates

    url = f"file://{tmp_path}/store"
    pub = rl.UpdatePublisher(url, "rl", files_from=llama, max_tp=2, max_delta_fraction=1e-6)
    pub.publish(trainer.served)
    trainer.step()
    live = {k: v.clone() for k, v in trainer.served.items()}
    decided = {k: v.clone() for k, v in live.items()}
    original = updates.write_chunks

    def late_step(*args, **kwargs):
        for v in live.values():
            v.add_(1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(updates, "write_chunks", late_step)
    pub.publish(live)
    monkeypatch.setattr(updates, "write_chunks", original)
    _check_loads(url, "rl", decided)
    assert pub.publish(decided).update["unchanged"] > 0
    _check_loads(url, "rl", decided)


def test_gc_keeps_the_chain_of_a_version_leased_after_its_survey(tmp_path, llama, trainer, monkeypatch):
    from raydist_loader.store import gc as gc_module
    from raydist_loader.store.leases import Lease

    url = f"file://{tmp_path}/store"
    v1, v2, kept = _built_on_then_replaced(url, llama, trainer)
    survey, leases = gc_module.survey, []

    def survey_then_a_load_starts(*args, **kwargs):
        out = survey(*args, **kwargs)
        leases.append(Lease.take(url, "rl", v2, "engine that started after the survey"))
        return out

    monkeypatch.setattr(gc_module, "survey", survey_then_a_load_starts)
    try:
        out = rl.gc(url, "rl", grace_s=0)
        assert not out["deleted"] and "is built on it" in out["reasons"][f"rl/{v1}/"]
        _check_loads_version(url, v2, kept)
    finally:
        leases[0].release()
