"""Expert parallelism without Ray or an engine: a rank pulls the routed experts it holds whole and no other
expert, every other tensor as at its tp; bytes and digests follow."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import raydist_loader as rl
from raydist_loader import index, load_shard, publish
from raydist_loader.cli import main
from raydist_loader.connectors import open_connector
from raydist_loader.load.worker import ShardLoader
from raydist_loader.store.experts import contiguous, expert_of, is_fused, layer_of, owned_by_layer, pull_whole
from raydist_loader.store.manifest import Manifest
from raydist_loader.store.plan import make_plan
from raydist_loader.store.versions import read_manifest_bytes
from raydist_loader.testing.tiny_models import TINY_DEFAULTS, make_tiny_checkpoint

from .shards import original_tensors, vllm_cut

EXPERTS = TINY_DEFAULTS["qwen3_moe"]["num_experts"]  # 4
TP = EP = 2


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The tiny qwen3_moe (per-expert tensors) published chunked at max_tp=4 and indexed in place, and a copy
    whose experts are 3-D fused tensors (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])."""
    root = tmp_path_factory.mktemp("experts")
    ckpt = make_tiny_checkpoint("qwen3_moe", root / "ckpt", dtype=torch.bfloat16)
    url = f"file://{root}/store"
    publish(ckpt, url, "chunked", max_tp=4)
    shutil.copytree(ckpt, root / "store" / "inplace")
    index(url, "inplace", max_tp=4)
    fused = root / "fused"
    shutil.copytree(ckpt, fused)
    state = load_file(fused / "model.safetensors")
    for layer in range(TINY_DEFAULTS["qwen3_moe"]["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([state.pop(f"{p}.{e}.gate_proj.weight"), state.pop(f"{p}.{e}.up_proj.weight")])
                   for e in range(EXPERTS)]
        state[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{e}.down_proj.weight") for e in range(EXPERTS)])
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    publish(fused, url, "fused", max_tp=4)
    return url, original_tensors(ckpt), state, ckpt


def _manifest(url: str, model: str) -> Manifest:
    with open_connector(url) as conn:
        return Manifest.from_json(read_manifest_bytes(conn, model)[1])


def _holds(rank: int):
    owned = contiguous(EXPERTS, EP, rank)
    return lambda name, expert: expert in owned


def test_routed_expert_names():
    assert expert_of("model.layers.3.block_sparse_moe.experts.7.w2.weight") == 7
    assert expert_of("model.layers.3.mlp.experts.12.gate_proj.weight") == 12
    for name in ("model.layers.3.mlp.shared_expert.gate_proj.weight",
                 "model.layers.3.mlp.shared_experts.up_proj.weight", "model.layers.3.mlp.gate.weight",
                 "model.layers.3.block_sparse_moe.gate.weight"):
        assert expert_of(name) is None and pull_whole(name, (8, 8), lambda n, e: False) is None, name
    assert layer_of("model.layers.3.mlp.experts.12.gate_proj.weight") == "model.layers.3.mlp.experts"
    assert layer_of("model.layers.3.mlp.experts.gate_up_proj") == "model.layers.3.mlp.experts"
    assert is_fused("model.layers.3.mlp.experts.gate_up_proj", (4, 64, 32))
    assert not is_fused("model.layers.3.mlp.experts.0.gate_proj.weight", (64, 32))
    holds = owned_by_layer({"model.layers.3.mlp.experts": [2, 3]})
    assert holds("model.layers.3.mlp.experts.2.up_proj.weight", 2)
    assert not holds("model.layers.3.mlp.experts.1.up_proj.weight", 1)
    assert holds("model.layers.4.mlp.experts.1.up_proj.weight", 1)  # a layer it does not know: pulled whole
    assert list(contiguous(8, 2, 1)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="4 experts cannot be placed evenly on ep=3 ranks"):
        contiguous(4, 3, 0)


@pytest.mark.parametrize("model", ["chunked", "inplace"])
def test_a_rank_pulls_exactly_its_experts_whole(moe, model):
    """Rank r of EP=2 holds experts [2r, 2r+2) whole (no TP cut inside them) and no other; attention, routers and
    norms as at tp=2; the digests verify and the bytes are exactly those tensors' bytes."""
    url, original, *_ = moe
    manifest = _manifest(url, model)
    for rank in range(EP):
        loader = ShardLoader(url, manifest, TP, rank, device="cpu", experts=_holds(rank))
        report = loader.load()
        assert report.failures == [] and report.digest == report.expected_digest
        tensors = loader.tensors
        held = {expert_of(n) for n in tensors} - {None}
        assert held == set(contiguous(EXPERTS, EP, rank)) == set(range(2 * rank, 2 * rank + 2))
        for name, full in original.items():
            expert = expert_of(name)
            if expert is not None and expert not in held:
                assert name not in tensors
                continue
            want = full if expert is not None else vllm_cut(name, full, TP, rank)
            assert torch.equal(tensors[name], want), (name, rank)
        assert report.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        loader.close()


def test_expert_bytes_are_the_ranks_share(moe):
    """Each rank's expert bytes are half of all experts' (not a TP half of every expert): over the two ranks
    every expert byte is pulled exactly once, and the other tensors as at tp=2."""
    url, original, *_ = moe
    manifest = _manifest(url, "chunked")
    expert_bytes = sum(t.numel() * t.element_size() for n, t in original.items() if expert_of(n) is not None)
    for rank in range(EP):
        tp_plan = make_plan(manifest, TP, rank)
        ep_plan = make_plan(manifest, TP, rank, experts=_holds(rank))
        names = {s.name: s for s in tp_plan.tensors}
        dense = sum(names[s.name].nbytes for s in tp_plan.tensors if expert_of(s.name) is None)
        assert ep_plan.bytes_kept == ep_plan.bytes_read == dense + expert_bytes // EP
        assert ep_plan.expected_digest != tp_plan.expected_digest


def test_global_layout_lands_whole_experts(moe):
    """The engines' layout: a held expert is its full tensor, every byte of it verified."""
    url, original, *_ = moe
    shard = load_shard("chunked", url, TP, 1, device="cpu", layout="global", experts=_holds(1))
    names = [n for n in shard.tensors if expert_of(n) is not None]
    assert names and {expert_of(n) for n in names} == {2, 3}
    for name in names:
        assert torch.equal(shard.tensors[name], original[name])
        assert shard.metadata[name]["segments"] == {"all": [0, original[name].shape[shard.metadata[name]["dim"]]]}


def test_fused_expert_tensors_are_pulled_whole_on_every_rank(moe):
    """A 3-D fused expert tensor's chunks each span every expert, so a rank can only verify it whole: it pulls
    every chunk (the engine keeps its experts' rows)."""
    url, _, fused, _ = moe
    manifest = _manifest(url, "fused")
    for rank in range(EP):
        loader = ShardLoader(url, manifest, TP, rank, device="cpu", experts=_holds(rank))
        report = loader.load()
        assert report.failures == []
        for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
            assert torch.equal(loader.tensors[name], fused[name]), (name, rank)
        loader.close()


def test_in_place_a_rank_reads_only_its_experts(moe):
    """In place (an indexed HF checkpoint) a TP rank's rowwise slice of every expert's down_proj is row-strided and
    read as one span of nearly the whole tensor; under EP a rank reads its own experts once, whole, and nothing of
    the others: fewer bytes from the store."""
    url, original, *_ = moe
    manifest = _manifest(url, "inplace")
    expert_bytes = sum(t.numel() * t.element_size() for n, t in original.items() if expert_of(n) is not None)
    for rank in range(EP):
        tp_plan, ep_plan = make_plan(manifest, TP, rank), make_plan(manifest, TP, rank, experts=_holds(rank))
        tp_experts = sum(p.nbytes for p in dict.fromkeys(
            p for r in tp_plan.reads if expert_of(tp_plan.tensors[r.tensor].name) is not None for p in r.pieces))
        ep_experts = sum(p.nbytes for p in dict.fromkeys(
            p for r in ep_plan.reads if expert_of(ep_plan.tensors[r.tensor].name) is not None for p in r.pieces))
        assert ep_experts == expert_bytes // EP < tp_experts


def test_inspect_ep_sizes_what_the_ranks_move(moe, capsys):
    """``inspect --ep`` from the store and ``--config-only`` agree with the EP plans, and an ep that is not a
    multiple of tp is refused naming both."""
    url, _, _, ckpt = moe
    manifest = _manifest(url, "chunked")
    stored = rl.inspect(url, "chunked", tp=TP, ep=EP)
    sized = rl.inspect_config(ckpt / "config.json", tp=TP, max_tp=4, ep=EP)
    want = [make_plan(manifest, TP, r, experts=_holds(r)).bytes_kept for r in range(EP)]
    assert [r["bytes"] for r in stored["ranks"]] == [r["bytes"] for r in sized["ranks"]] == want
    assert rl.inspect(url, "chunked", ep=4)["tp"] == 4  # tp defaults to ep
    dp_ep = rl.inspect(url, "chunked", tp=1, ep=2)["ranks"]  # tp=1 x dp=2: dense tensors whole on both ranks
    assert [r["bytes"] for r in dp_ep] == [make_plan(manifest, 1, 0, experts=_holds(r)).bytes_kept for r in range(2)]
    assert main(["inspect", url, "--model", "chunked", "--tp", "2", "--ep", "2"]) == 0
    assert "at tp=2, ep=2:" in capsys.readouterr().out
    assert main(["inspect", url, "--model", "chunked", "--tp", "2", "--ep", "3"]) == 2
    assert "ep=3 must be a positive multiple of tp=2" in capsys.readouterr().err
