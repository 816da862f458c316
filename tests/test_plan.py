"""The plan and the worker without Ray: every rank's shard follows vLLM's cut, and the shards reassemble the model."""

from __future__ import annotations

import shutil

import pytest
import torch

from raydist_loader import index, publish
from raydist_loader.errors import ShardingError
from raydist_loader.load.transfer import Transfer
from raydist_loader.load.transfer_gpu import GpuTransfer
from raydist_loader.load.worker import ShardLoader
from raydist_loader.store.grid import padded_vocab
from raydist_loader.store.manifest import Manifest
from raydist_loader.store.plan import make_plan
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import assert_shards_match, original_tensors, stored_manifest


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny GQA llama (8 q heads, 2 kv heads, vocab 250) published chunked at max_tp=8 and indexed in place."""
    root = tmp_path_factory.mktemp("plan")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", dtype=torch.bfloat16)
    url = f"file://{root}/store"
    publish(ckpt, url, "chunked", max_tp=8, part_bytes=64 << 10)
    shutil.copytree(ckpt, root / "store" / "inplace")
    index(url, "inplace", max_tp=8)
    return url, original_tensors(ckpt)


def _load(url: str, model: str, tp: int) -> list[ShardLoader]:
    raw = stored_manifest(url, model)
    loaders = [ShardLoader(url, raw, tp, rank, device="cpu") for rank in range(tp)]
    for w in loaders:
        report = w.load()
        assert report.failures == [] and report.digest == report.expected_digest
    return loaders


@pytest.mark.parametrize("model", ["chunked", "inplace"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shards_reassemble_every_tensor(llama, model, tp):
    url, original = llama
    loaders = _load(url, model, tp)
    assert_shards_match(original, [(w.tensors, w.metadata()) for w in loaders])


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_cuts_follow_vllm(llama, tp):
    """q heads split evenly, kv heads as QKVParallelLinear (replicated past 2 ranks), vocab as vLLM pads it."""
    url, original = llama
    manifest = Manifest.from_json(stored_manifest(url, "chunked"))
    vocab, head_dim, kv_heads = 250, 8, 2
    per = padded_vocab(vocab) // tp
    for rank in range(tp):
        slots = {s.name: s for s in make_plan(manifest, tp, rank).tensors}
        emb = slots["model.embed_tokens.weight"]
        assert emb.segments.get("all", (min(vocab, rank * per),) * 2) == (
            min(vocab, rank * per),
            min(vocab, (rank + 1) * per),
        )
        q = slots["model.layers.0.self_attn.q_proj.weight"]
        assert q.segments["all"] == (rank * 64 // tp, (rank + 1) * 64 // tp)
        k = slots["model.layers.0.self_attn.k_proj.weight"]
        head = rank // (tp // kv_heads) if tp > kv_heads else None
        want = (
            (head * head_dim, (head + 1) * head_dim) if head is not None else (rank * 16 // tp, (rank + 1) * 16 // tp)
        )
        assert k.segments["all"] == want and k.kv_replicas == max(1, tp // kv_heads)
        o = slots["model.layers.0.self_attn.o_proj.weight"]
        assert o.dim == 1 and o.shape == (64, 64 // tp)
    assert original["model.embed_tokens.weight"].shape[0] == vocab


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_chunked_layout_reads_only_kept_bytes(llama, tp):
    url, _ = llama
    manifest = Manifest.from_json(stored_manifest(url, "chunked"))
    for rank in range(tp):
        plan = make_plan(manifest, tp, rank)
        assert plan.bytes_read == plan.bytes_kept
        assert sum(s.nbytes for s in plan.tensors) == plan.bytes_kept


def test_inplace_reads_each_span_once(llama):
    """A rank's run of strided chunks shares one span: at tp=1 every byte is read exactly once; below, a rank reads
    its row-parallel tensors' rows whole (the gaps are small) and everything else exactly."""
    url, _ = llama
    manifest = Manifest.from_json(stored_manifest(url, "inplace"))
    assert make_plan(manifest, 1, 0).bytes_read == make_plan(manifest, 1, 0).bytes_kept == manifest.total_bytes
    for rank in range(2):
        plan = make_plan(manifest, 2, rank)
        rowwise = sum(s.nbytes for s in plan.tensors if s.dim == 1)
        assert plan.bytes_read <= plan.bytes_kept + rowwise  # each row-parallel span read once, not per chunk


def test_inplace_rowwise_reads_are_coalesced_and_reported(llama):
    url, _ = llama
    loaders = _load(url, "inplace", 2)
    report = loaders[0].load()
    assert report.bytes_read > report.bytes, "dim-1 shards read whole row spans and slice on the actor"
    plan = loaders[0].plan
    o_reads = [r for r in plan.reads if plan.tensors[r.tensor].name.endswith("o_proj.weight")]
    assert o_reads and all(len(r.pieces) == 1 and r.extract is not None for r in o_reads)


def test_unserved_tp_lists_the_served_ones(llama):
    url, _ = llama
    manifest = Manifest.from_json(stored_manifest(url, "chunked"))
    with pytest.raises(ShardingError, match=r"tp=3.*serves tp in \[1, 2, 4, 8\].*--max-tp"):
        make_plan(manifest, 3, 0)
    with pytest.raises(ValueError, match="outside tp=2"):
        make_plan(manifest, 2, 2)


@pytest.mark.parametrize("model", ["chunked", "inplace"])
@pytest.mark.parametrize("request_bytes", [3000, 64 << 10])
def test_small_requests_split_chunks_across_batches_and_still_reassemble(llama, model, request_bytes, monkeypatch):
    """Chunks cut into many requests, staged chunks bigger than a batch, and mixed batches all land right."""
    from raydist_loader.connectors.file import FileConnector

    monkeypatch.setattr(FileConnector, "max_request_bytes", request_bytes)
    url, original = llama
    for tp in (1, 2):
        loaders = _load(url, model, tp)
        assert_shards_match(original, [(w.tensors, w.metadata()) for w in loaders])


@pytest.mark.parametrize("tp", [1, 2])
def test_gpu_copy_groups_never_cover_bytes_outside_them(llama, tp):
    """The GPU path sends each group with one H2D copy: runs must be truly adjacent in the arena, column-block
    groups must hold all of a tensor's blocks, and a re-pull of some chunks must not drag others along."""
    url, _ = llama
    raw = stored_manifest(url, "chunked")
    loader = ShardLoader(url, raw, tp, 0, device="cpu")
    loader.prepare()
    # the GPU path's grouping, on a CPU arena (grouping never touches CUDA)
    w = GpuTransfer(loader.plan, torch.device("cpu"), loader.connector, loader.retry_policy, 0, loader._hasher)
    groups = w._groups(w.plan.reads, target=64 << 10)
    assert sorted((r.tensor, r.chunk) for g in groups for r in g) == sorted((r.tensor, r.chunk) for r in w.plan.reads)
    for g in groups:
        if w._arena_run(g[0]):
            assert all(w._adjacent(a, b) for a, b in zip(g, g[1:], strict=False))
        elif len(g) > 1:
            assert w._columns(g), "column blocks travel together only when they are all of the tensor"
    columns = [g for g in groups if len(g) > 1 and w._columns(g)]
    assert columns, "row-parallel tensors below max_tp come as column blocks"
    some = columns[0][::2]  # a re-pull of every other block
    assert [len(g) for g in w._groups(some)] == [1] * len(some)


@pytest.mark.parametrize("model", ["chunked", "inplace"])
@pytest.mark.parametrize("part_bytes", [16, 512])
def test_chunks_bigger_than_a_staging_buffer_are_read_in_parts(llama, model, part_bytes, monkeypatch):
    """A chunk or in-place span larger than the staging buffer is read, hashed and placed part by part (whole rows,
    or one row when a row is larger): every shard still reassembles and verifies."""
    streamed = []
    stream = Transfer._stream

    def spy(self, group, buf, conn, place):
        widest = max(self._rows(r)[1] for r in self.plan.reads if not self._arena_run(r))
        assert buf.numel() <= max(part_bytes, 2 * widest), "a staging buffer bigger than a part (or two rows)"
        streamed.append(sum(1 for _ in self._parts(group)))
        return stream(self, group, buf, conn, place)

    monkeypatch.setattr(Transfer, "part_bytes", part_bytes)
    monkeypatch.setattr(Transfer, "_stream", spy)
    url, original = llama
    for tp in (1, 2):
        loaders = _load(url, model, tp)
        assert_shards_match(original, [(w.tensors, w.metadata()) for w in loaders])
    assert streamed and max(streamed) > 1, "some reads came in several parts"


def test_gpu_staging_buffers_stay_within_a_part(llama, monkeypatch):
    """The GPU path's groups (grouping runs on a CPU arena) never need a staging buffer bigger than a part: whole
    column-block tensors are assembled only when they fit, bigger chunks are read in parts."""
    monkeypatch.setattr(Transfer, "part_bytes", 1024)
    url, _ = llama
    raw = stored_manifest(url, "chunked")
    loader = ShardLoader(url, raw, 1, 0, device="cpu")
    loader.prepare()
    w = GpuTransfer(loader.plan, torch.device("cpu"), loader.connector, loader.retry_policy, 0, loader._hasher)
    groups = w._groups(w.plan.reads)
    assert any(w._in_parts(g) for g in groups)
    assert all(w._stage_size(g, w._group_bytes(g)) <= max(1024, 2 * w._rows(g[0])[1]) for g in groups)
