"""The engine hand-off streamed, and read straight into parameters, without an engine.

``rank_weights`` yields each tensor once its chunks verified (equal to the ``global`` layout's), raises out of the
iterator on a chunk that stays wrong, and keeps host memory bounded whatever the shard's size. ``load_into`` first
learns where a model's weight loaders copy each tensor (a model written like vLLM's: fused qkv/gate_up segments,
column- and row-parallel narrows, vocab with zero-filled padding, a cast), reads the plain copies straight into the
parameters and streams the rest; the result equals the model's own ``load_weights`` over the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import raydist_loader as rl
from raydist_loader import connectors
from raydist_loader.api import load_shard
from raydist_loader.engines.handoff import EngineOptions, load_into, rank_weights, update_rank
from raydist_loader.errors import VerificationError
from raydist_loader.load.transfer import Transfer
from raydist_loader.testing.faulty import FaultyConnector
from raydist_loader.testing.memory import stream_growth
from raydist_loader.testing.tiny_models import make_big_llama, make_tiny_checkpoint

from .shards import corrupt_copy, publish_cases

MAX_TP = 4
CASES = [("llama", "chunked"), ("phi3", "chunked"), ("gemma", "chunked"), ("mixtral", "chunked"),
         ("llama", "in-place")]
ROWWISE = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[str, Path]]:
    """(model_type, layout) -> (store url, checkpoint directory)."""
    return publish_cases(tmp_path_factory.mktemp("stream"), CASES, MAX_TP)


def _options(url: str, model: str, **more) -> EngineOptions:
    return EngineOptions.parse({"url": url, "model": model, **more}, "extra")


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(("model_type", "layout"), CASES)
def test_streamed_tensors_equal_the_global_layout(stores, model_type, layout, tp):
    url, _ = stores[(model_type, layout)]
    for rank in range(tp):
        weights, report = rank_weights(_options(url, model_type), tp, rank)
        glob = load_shard(model_type, url, tp, rank, device="cpu", layout="global")
        seen = []
        for name, tensor in weights:
            seen.append(name)
            meta = glob.metadata[name]
            assert tensor.shape == glob.tensors[name].shape and tensor.dtype == glob.tensors[name].dtype
            if meta["dim"] is None:
                assert torch.equal(tensor, glob.tensors[name]), name
                continue
            for a, b in meta["segments"].values():
                d = meta["dim"]
                assert torch.equal(tensor.narrow(d, a, b - a), glob.tensors[name].narrow(d, a, b - a)), (name, a)
        assert seen == list(glob.tensors)  # every tensor once, in plan order
        got = report()
        assert got.digest == got.expected_digest == glob.report.digest and got.bytes == glob.report.bytes



def test_a_chunk_wrong_in_the_store_raises_from_the_iterator_naming_rank_tensor_chunk(stores, tmp_path, monkeypatch):
    monkeypatch.setattr(Transfer, "part_bytes", 16 << 10)  # tensors handed over in groups of 16 KiB (and read so)
    url, _ = stores[("llama", "chunked")]
    bad = corrupt_copy(tmp_path, url, "llama", ROWWISE, "all.3")  # rank 1 of tp=2 reads it
    weights, _ = rank_weights(_options(bad, "llama"), 2, 1)
    before = []
    with pytest.raises(VerificationError) as e:
        for name, _tensor in weights:
            before.append(name)
    assert f"rank 1: tensor {ROWWISE} chunk all.3" in str(e.value) and "after one re-pull" in str(e.value)
    assert ROWWISE not in before and before  # the tensors before it were handed over, the wrong one never
    # rank 0 does not read that chunk: it loads
    weights, report = rank_weights(_options(bad, "llama"), 2, 0)
    assert len(list(weights)) and report().verified
    # straight into parameters: the same error out of load_into
    model = VllmLikeLlama(_config(stores[("llama", "chunked")][1]), 2, 1)
    with pytest.raises(VerificationError, match=f"rank 1: tensor {ROWWISE} chunk all.3"):
        load_into(model, _options(bad, "llama"), 2, 1)


def test_a_chunk_corrupted_in_transit_heals_on_its_re_pull(stores, monkeypatch):
    monkeypatch.setattr(connectors, "_registered", dict(connectors._registered))  # faulty+ for this test only
    FaultyConnector.register()
    url, _ = stores[("llama", "chunked")]
    faulty = "faulty+" + url + "?corrupt=.safetensors"  # every object, once: each chunk read first arrives wrong
    weights, report = rank_weights(_options(faulty, "llama"), 2, 1)
    assert len(list(weights)) == len(load_file(stores[("llama", "chunked")][1] / "model.safetensors"))
    got = report()
    assert got.verified and got.repulled >= 1


def test_host_memory_while_streaming_is_bounded_by_staging_not_by_the_shard(tmp_path):
    """A 64 MB bf16 llama at tp=1 with 2 MiB staging parts: the whole-shard load grows by the shard, the stream
    by its staging ((concurrency + 2) parts) plus one tensor (the largest, 16 MB: embeddings) at most."""
    ckpt = make_big_llama(tmp_path / "ckpt", 64_000_000)
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "big", max_tp=2)
    part, concurrency = 2 << 20, 2
    largest = max(t.numel() * t.element_size() for t in load_file(ckpt / "model.safetensors").values())
    streamed = stream_growth(url, "big", 1, part_bytes=part, concurrency=concurrency)
    assert streamed["verified"] and streamed["shard"] > 60e6
    bound = (concurrency + 2) * part + largest
    assert streamed["growth"] <= bound + (12 << 20), (streamed, bound)
    assert streamed["growth"] < 0.6 * streamed["shard"], streamed


# ---------------------------------------------------------------- straight into parameters


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


class VllmLikeLlama(torch.nn.Module):
    """A llama's parameters and ``load_weights`` as vLLM builds them for one TP rank: fused ``qkv_proj`` and
    ``gate_up_proj`` (segment narrows, kv heads replicated when tp > kv heads), row-parallel ``o_proj``/``down_proj``
    (narrow on dim 1), vocab-parallel embeddings (padding zero-filled), replicated norms; ``model.norm.weight`` is
    float64 (``copy_`` casts: not a plain copy), input layernorms go through ``clone()`` (not a view) and layer 1's
    post-attention layernorm is checked with ``.item()`` (raises on a meta probe); layer 0's ``down_proj`` is
    multiplied in place after its copy (a write over a copied region)."""

    STACKED = (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
               ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))

    def __init__(self, cfg: dict, tp: int, rank: int):
        super().__init__()
        h, n, k, inter, vocab = (cfg[key] for key in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                       "intermediate_size", "vocab_size"))
        d = cfg.get("head_dim") or h // n
        self.tp, self.rank, self.vocab = tp, rank, vocab
        self.q, self.kv, self.inter, self.kv_reps = n * d // tp, max(1, k // tp) * d, inter // tp, max(1, tp // k)
        self.per = -(-vocab // 64) * 64 // tp
        shapes = {"model.embed_tokens.weight": (self.per, h), "lm_head.weight": (self.per, h),
                  "model.norm.weight": (h,)}
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            shapes |= {p + "self_attn.qkv_proj.weight": (self.q + 2 * self.kv, h), p + "self_attn.o_proj.weight":
                       (h, self.q), p + "mlp.gate_up_proj.weight": (2 * self.inter, h), p + "mlp.down_proj.weight":
                       (h, self.inter), p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        self.names = list(shapes)
        for name, shape in shapes.items():
            dtype = torch.float64 if name == "model.norm.weight" else torch.float32
            param = torch.nn.Parameter(torch.full(shape, float("nan"), dtype=dtype), requires_grad=False)
            self.register_parameter(name.replace(".", "__"), param)

    def param(self, name: str) -> torch.nn.Parameter:
        return getattr(self, name.replace(".", "__"))

    def load_weights(self, weights):
        loaded = set()
        for name, w in weights:
            for part, fused, shard in self.STACKED:
                if f".{part}." in name:
                    name = name.replace(part, fused)
                    self._stacked(self.param(name), w, shard)
                    break
            else:
                param = self.param(name)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    cols = param.shape[1]
                    param.data.copy_(w.narrow(1, self.rank * cols, cols))
                    if name == "model.layers.0.mlp.down_proj.weight":  # changed after its copy
                        param.data.mul_(1.0)
                elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                    start, end = min(self.vocab, self.rank * self.per), min(self.vocab, (self.rank + 1) * self.per)
                    w = w.narrow(0, start, end - start)
                    param[: w.shape[0]].data.copy_(w)
                    param[w.shape[0] :].data.fill_(0)
                elif name.endswith("input_layernorm.weight"):
                    param.data.copy_(w.clone())
                elif name == "model.layers.1.post_attention_layernorm.weight":  # .item() raises on a probe
                    assert torch.isfinite(w).all().item()
                    param.data.copy_(w)
                else:
                    param.data.copy_(w)
            loaded.add(name)
        return loaded

    def _stacked(self, param, w, shard) -> None:
        if shard in ("q", "k", "v"):
            size = self.q if shard == "q" else self.kv
            offset = {"q": 0, "k": self.q, "v": self.q + self.kv}[shard]
            start = self.rank * size if shard == "q" else (self.rank // self.kv_reps) * size
        else:
            size, offset, start = self.inter, shard * self.inter, self.rank * self.inter
        param.data.narrow(0, offset, size).copy_(w.narrow(0, start, size))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("layout", ["chunked", "in-place"])
def test_plain_copies_go_straight_into_parameters_the_rest_through_load_weights(stores, layout, tp):
    url, ckpt = stores[("llama", layout)]
    full = load_file(ckpt / "model.safetensors")
    cfg = _config(ckpt)
    for rank in range(tp):
        reference = VllmLikeLlama(cfg, tp, rank)
        expected_loaded = reference.load_weights(full.items())
        model = VllmLikeLlama(cfg, tp, rank)
        delivery = load_into(model, _options(url, "llama"), tp, rank)
        assert delivery.loaded == expected_loaded == set(model.names)
        assert delivery.report.verified and delivery.report.digest == delivery.report.expected_digest
        for name in model.names:
            assert torch.equal(model.param(name), reference.param(name)), (name, rank)
        captured = delivery.capture
        raises, changed = "model.layers.1.post_attention_layernorm.weight", "model.layers.0.mlp.down_proj.weight"
        fallback = {"model.norm.weight", raises, changed} | {n for n in full if n.endswith("input_layernorm.weight")}
        assert set(captured.fallback) == fallback
        assert "casts" in captured.fallback["model.norm.weight"]
        assert "not a view" in captured.fallback["model.layers.0.input_layernorm.weight"]
        assert "raised RuntimeError on a probe" in captured.fallback[raises]
        assert "overlaps its destination" in captured.fallback[changed]
        assert set(captured.direct_names) == set(full) - fallback


def test_direct_false_streams_everything_through_load_weights(stores):
    url, ckpt = stores[("llama", "chunked")]
    cfg = _config(ckpt)
    reference = VllmLikeLlama(cfg, 2, 1)
    reference.load_weights(load_file(ckpt / "model.safetensors").items())
    model = VllmLikeLlama(cfg, 2, 1)
    delivery = load_into(model, _options(url, "llama"), 2, 1, direct=False)
    assert delivery.capture is None and delivery.report.verified
    assert all(torch.equal(model.param(n), reference.param(n)) for n in model.names)


def test_a_reload_that_fails_verification_leaves_every_parameter_as_it_was(stores, tmp_path, monkeypatch):
    """Reloads (vLLM ``get_all_weights``) verify before write (``update_rank``): a wrong byte in the new version
    raises before the model's loaders got any tensor. Streamed, the same reload would have changed the tensors
    before the wrong one: a mix of two versions."""
    monkeypatch.setattr(Transfer, "part_bytes", 16 << 10)
    url, ckpt = stores[("llama", "chunked")]
    other = make_tiny_checkpoint("llama", tmp_path / "other", seed=5)
    newer = f"file://{tmp_path}/newer"
    rl.publish(other, newer, "llama", max_tp=MAX_TP)
    bad = corrupt_copy(tmp_path, newer, "llama", ROWWISE, "all.3")
    model = VllmLikeLlama(_config(ckpt), 2, 1)
    load_into(model, _options(url, "llama"), 2, 1)
    before = {n: model.param(n).clone() for n in model.names}

    def reload(whole: bool) -> None:
        def get_all_weights():  # as vLLM's reload consumes the loader's iterator
            if whole:
                yield from update_rank(_options(bad, "llama"), 2, 1).weights
            else:
                yield from rank_weights(_options(bad, "llama"), 2, 1)[0]

        with pytest.raises(VerificationError, match=f"rank 1: tensor {ROWWISE} chunk all.3"):
            model.load_weights(get_all_weights())

    reload(whole=True)
    assert all(torch.equal(model.param(n), before[n]) for n in model.names)
    reload(whole=False)
    assert not all(torch.equal(model.param(n), before[n]) for n in model.names)


def test_streaming_from_redis_keeps_a_bounded_number_of_connections(stores, redis_server, monkeypatch):
    """Each streamed group is pulled on a fresh thread pool; every thread opened its own raw connection, and they
    all stayed open until the end of the load (one socket per group and thread: a big model ran out of fds)."""
    from raydist_loader.connectors.redis import RedisConnector

    monkeypatch.setattr(Transfer, "part_bytes", 16 << 10)  # many small groups
    redis_server.start()
    with redis_server.client() as client:
        client.flushdb()
    _, ckpt = stores[("llama", "chunked")]
    rl.publish(ckpt, redis_server.url, "llama", max_tp=MAX_TP)
    opened = []
    original = RedisConnector._connection

    def counted(self, addr):
        conn, reused = original(self, addr)
        if not reused:
            opened.append(conn)
        return conn, reused

    monkeypatch.setattr(RedisConnector, "_connection", counted)
    weights, report = rank_weights(_options(redis_server.url, "llama"), 2, 1)
    groups = 0
    for _name, _tensor in weights:
        groups += 1
        assert sum(not c._sock._closed for c in opened) <= 8, f"{len(opened)} connections open after {groups}"
    assert report().verified and groups > 8


class AdvancedIndexLoader(torch.nn.Module):
    """Every tensor replicated whole (tp=1), written through ``param.data[rows] = w``: advanced indexing on the left
    is a write through ``__setitem__``, but ``param.data[rows]`` read alone is a new tensor, not a view."""

    def __init__(self, full: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(full)
        for name, t in full.items():
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(
                torch.full(t.shape, float("nan"), dtype=t.dtype), requires_grad=False))

    def param(self, name: str) -> torch.nn.Parameter:
        return getattr(self, name.replace(".", "__"))

    def load_weights(self, weights):
        for name, w in weights:
            param = self.param(name)
            param.data[list(range(param.shape[0]))] = w
        return set(self.names)


def test_a_write_through_advanced_indexing_is_not_read_into_a_temporary(stores):
    """The capture must not take the temporary that ``param[index]`` makes for the parameter's region: bytes read
    there would be lost, and the parameter left as it was while the load reports verified."""
    url, ckpt = stores[("llama", "chunked")]
    full = load_file(ckpt / "model.safetensors")
    model = AdvancedIndexLoader(full)
    delivery = load_into(model, _options(url, "llama"), 1, 0)
    assert delivery.report.verified
    wrong = [n for n in model.names if not torch.equal(model.param(n), full[n])]
    assert not wrong, f"{len(wrong)} parameters not written, e.g. {wrong[0]}"
    assert not delivery.capture.direct and all("index" in why for why in delivery.capture.fallback.values())


class ThroughATemporary(AdvancedIndexLoader):
    """Each tensor copied into a temporary first (a plain copy, as seen alone), then from it into the parameter."""

    def load_weights(self, weights):
        for name, w in weights:
            tmp = torch.empty(w.shape, dtype=w.dtype)
            tmp.copy_(w)
            self.param(name).data.copy_(tmp)
        return set(self.names)


def test_a_copy_into_a_tensor_that_is_not_the_models_is_not_read_into(stores):
    """A copy whose destination is not the model's (a loader's temporary, copied on later) goes through
    ``load_weights``: read straight into the temporary, the parameter would never get the bytes."""
    url, ckpt = stores[("llama", "chunked")]
    full = load_file(ckpt / "model.safetensors")
    model = ThroughATemporary(full)
    delivery = load_into(model, _options(url, "llama"), 1, 0)
    wrong = [n for n in model.names if not torch.equal(model.param(n), full[n])]
    assert not wrong, f"{len(wrong)} parameters not written, e.g. {wrong[0]}"
    assert not delivery.capture.direct and delivery.report.verified
