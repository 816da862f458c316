"""Quantized checkpoints as they ship (FP8 blocks, compressed-tensors FP8): every weight and scale of every rank at
every served tp equals what vLLM's weight loaders narrow out of the full tensor, on the file store and Redis,
published and indexed in place; a tp that would split a quantization block is refused naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import raydist_loader as rl
from raydist_loader.connectors import open_connector
from raydist_loader.errors import ShardingError
from raydist_loader.testing.quantized import make_tiny_quantized_checkpoint

from .shards import original_tensors, stored_manifest

BLOCK = 16
# name -> (model_type, make_tiny_quantized_checkpoint options, max_tp it publishes at, the tps it serves)
CASES = {
    # Qwen3-FP8 layout: 8 q heads / 2 kv heads of 16 rows = one block each, so every tp up to 8 is served
    "qwen3-fp8": ("qwen3", {"scheme": "fp8_block"}, 8, [1, 2, 4, 8]),
    # DeepSeek-V3 layout: q_b_proj heads of 24 rows (2 heads = 3 blocks), MoE experts of 64 rows: up to tp=4
    "deepseek-fp8": ("deepseek_v3", {"scheme": "fp8_block"}, 4, [1, 2, 4]),
    # compressed-tensors FP8 per channel: weight_scale [out, 1], static input_scale [1]
    "qwen3-ct-channel": ("qwen3", {"scheme": "ct_channel"}, 8, [1, 2, 4, 8]),
    # compressed-tensors FP8 blocks (scale named weight_scale) in float8_e5m2; heads of 16 rows = one block
    "llama-ct-block-e5m2": ("llama", {"scheme": "ct_block", "fmt": "e5m2", "head_dim": 16}, 4, [1, 2, 4]),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {
        name: make_tiny_quantized_checkpoint(model_type, root / name, block=(BLOCK, BLOCK), **options)
        for name, (model_type, options, _, _) in CASES.items()
    }


@pytest.fixture(scope="module")
def stores(checkpoints, redis_server, tmp_path_factory):
    """Every case published (chunked) and indexed in place on a directory and on a real redis-server."""
    root = tmp_path_factory.mktemp("quantized-stores")
    redis_server.start()
    with redis_server.client() as client:
        client.flushdb()
    urls = {"file": f"file://{root}/store", "redis": redis_server.url}
    for url in urls.values():
        for name, ckpt in checkpoints.items():
            max_tp = CASES[name][2]
            rl.publish(ckpt, url, f"{name}-chunked", max_tp=max_tp, part_bytes=32 << 10)
            with open_connector(url) as conn:
                for path in sorted(ckpt.iterdir()):
                    conn.write(f"{name}-inplace/{path.name}", path.read_bytes())
            rl.index(url, f"{name}-inplace", max_tp=max_tp)
    return urls


# ------------------------------------------------------------------------------------------ vLLM's cut, by hand
_VOCAB = ("embed_tokens.weight", "lm_head.weight")
_COLUMN = ("q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")  # ColumnParallel / Merged / QKV's q
_KV = ("k_proj", "v_proj")  # QKVParallelLinear's k and v: kv heads split, or replicated past tp = kv heads
_ROW = ("o_proj", "down_proj")  # RowParallelLinear: the input dim


def vllm_slice(name: str, tensors: dict[str, torch.Tensor], tp: int, rank: int, kv_heads: int) -> torch.Tensor:
    """What vLLM's loaders narrow out of the full checkpoint tensor ``name`` for ``rank`` (written from vLLM's
    ColumnParallel/QKV/RowParallel/VocabParallel loaders and ``adjust_block_scale_shard``: a block scale's shard is
    ceil(weight rows per rank / block) at shard_id times that; a per-channel scale follows a column weight's rows
    and is whole for a row-parallel weight; per-tensor scales and everything else are whole)."""
    full = tensors[name]
    module, _, kind = name.rpartition(".")
    layer = module.rpartition(".")[2]
    if name.endswith(_VOCAB):
        per = -(-full.shape[0] // 64) * 64 // tp
        return full[min(full.shape[0], rank * per) : min(full.shape[0], (rank + 1) * per)]
    if layer not in _COLUMN + _KV + _ROW or full.numel() <= 1:
        return full  # norms, routers, latent (a) projections, input_scale
    block_scale = kind in ("weight_scale_inv", "weight_scale") and full.shape[-1] != 1
    per_channel = kind == "weight_scale" and not block_scale
    rows, cols = tensors[f"{module}.weight"].shape
    if layer in _ROW:
        if per_channel:
            return full
        size = -(-cols // tp // BLOCK) if block_scale else cols // tp
        return full[:, rank * size : (rank + 1) * size]
    rows, shard_id = rows // tp, rank
    if layer in _KV and tp > kv_heads:
        rows, shard_id = rows * tp // kv_heads, rank // (tp // kv_heads)
    size = -(-rows // BLOCK) if block_scale else rows
    return full[shard_id * size : (shard_id + 1) * size]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ------------------------------------------------------------------------------------------ tests
def test_checkpoints_are_laid_out_as_shipped(checkpoints):
    """The tiny checkpoints carry the real names, dtypes and scale shapes of their formats."""
    with safe_open(str(checkpoints["deepseek-fp8"] / "model.safetensors"), "pt") as f:
        kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
        assert f.get_slice(kv_a).get_dtype() == "F8_E4M3" and f.get_slice(kv_a).get_shape() == [40, 64]
        assert f.get_slice(f"{kv_a}_scale_inv").get_shape() == [3, 4]  # 40 rows = 2.5 blocks of 16
        assert not f.get_slice("model.layers.1.mlp.gate.weight").get_dtype().startswith("F8")  # routers: unquantized
    with safe_open(str(checkpoints["qwen3-ct-channel"] / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_shape() == [64, 1]
        assert f.get_slice("model.layers.0.mlp.down_proj.input_scale").get_shape() == [1]
    with safe_open(str(checkpoints["llama-ct-block-e5m2"] / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight").get_dtype() == "F8_E5M2"
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight_scale").get_shape() == [4, 8]
    config = json.loads((checkpoints["deepseek-fp8"] / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]


@pytest.mark.parametrize("kind", ["file", "redis"])
@pytest.mark.parametrize("layout", ["chunked", "inplace"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_weight_and_scale_is_cut_as_vllm_cuts_it(stores, checkpoints, kind, layout, case):
    """Each rank's float8 weights and float32 scales equal vLLM's narrow of the full tensor, byte for byte, with
    every digest checked on the final tensors (fp8 hashed through a uint8 view)."""
    url, model = stores[kind], f"{case}-{layout}"
    full = original_tensors(checkpoints[case])
    kv_heads = json.loads((checkpoints[case] / "config.json").read_text())["num_key_value_heads"]
    served = CASES[case][3]
    assert rl.inspect(url, model)["served_tp"] == served
    for tp in served:
        for rank in range(tp):
            shard = rl.load_shard(model, url, tp, rank, device="cpu", verify="full")
            assert shard.tensors.keys() == full.keys()
            for name, tensor in full.items():
                want = vllm_slice(name, full, tp, rank, kv_heads)
                got = shard.tensors[name]
                assert got.dtype == tensor.dtype and got.shape == want.shape, (name, tp, rank)
                assert torch.equal(_bytes(got), _bytes(want)), (name, tp, rank)


def test_block_scales_cut_in_whole_blocks_are_recorded_with_their_weight(stores):
    """The manifest records a scale's cut in the weight's rows (segments) with block_scale = the block; a rank's
    metadata gives the scale rows it holds, so an engine can place them in a full-size tensor."""
    url = stores["file"]
    assert rl.verify(url, "deepseek-fp8-chunked").ok and rl.verify(stores["redis"], "deepseek-fp8-inplace").ok
    shard = rl.load_shard("deepseek-fp8-chunked", url, 4, 3, device="cpu")
    q_b = "model.layers.0.self_attn.q_b_proj.weight"
    assert shard.metadata[q_b]["segments"] == {"all": [144, 192]}  # 2 heads of 24 rows
    scale = shard.metadata[f"{q_b}_scale_inv"]
    assert (scale["global_shape"], scale["shape"], scale["segments"]) == ([12, 2], [3, 2], {"all": [9, 12]})
    down = shard.metadata["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"]
    assert (down["dim"], down["global_shape"], down["segments"]) == (1, [4, 4], {"all": [3, 4]})
    manifest = json.loads(stored_manifest(url, "deepseek-fp8-chunked"))
    rule = manifest["tensor_rules"][manifest["tensors"][f"{q_b}_scale_inv"]["rule"]]
    assert rule["block_scale"] == BLOCK and rule["segments"][0] == {
        "name": "all", "size": 192, "heads": "q", "unit": 24, "block": BLOCK}


def test_tp_that_splits_a_block_is_refused_naming_the_tensor_and_the_working_tps(checkpoints, tmp_path):
    """DeepSeek's q_b_proj has 24-row heads: tp=8 gives each rank one head = 1.5 blocks of 16 (vLLM refuses it)."""
    url = f"file://{tmp_path}/store"
    expected = (
        r"cannot publish with max_tp=8: model\.layers\.0\.self_attn\.q_b_proj\.weight: segment 'all' would be cut "
        r"into 24 rows of dim 0 per rank at tp=8, which splits its 16-row quantization blocks; .*"
        r"pass --max-tp 4 \(max_tp values up to 8 that work: \[1, 2, 4\]\)"
    )
    with pytest.raises(ShardingError, match=expected):
        rl.publish(checkpoints["deepseek-fp8"], url, "m", max_tp=8)
    shutil.copytree(checkpoints["deepseek-fp8"], tmp_path / "store" / "hf")
    with pytest.raises(ShardingError, match=expected):
        rl.index(url, "hf", max_tp=8)
    summary = rl.inspect_config(checkpoints["deepseek-fp8"] / "config.json", tp=8)
    assert "ranks" not in summary and "q_b_proj.weight: segment 'all' would be cut into 24 rows" in summary["refused"]
    sized = rl.inspect_config(checkpoints["deepseek-fp8"] / "config.json", tp=4, max_tp=4)
    assert sized["served_tp"] == [1, 2, 4] and len(sized["ranks"]) == 4
