"""``inspect --config-only``: per-rank bytes of real models from their config.json alone (meta tensors), checked
against totals computed by hand from the public configs, and against a real publish of tiny models."""

from __future__ import annotations

import json
import re

import pytest
import torch

import raydist_loader as rl
from raydist_loader.cli import main
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

BF16 = 2
# config.json of each model as published on the Hugging Face hub (the fields that matter, values verbatim)
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 8192, "intermediate_size": 28672, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 151936,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                     "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 129280,
}


def _dense_rank_params(h, layers, q, kv_rows, inter, vocab, tp, *, extra_split=0, extra_replicated=0) -> dict:
    """Parameters one rank keeps: attention and MLP cut by tp (kv rows given per rank), norms replicated,
    vocab rows padded to 64 and cut evenly (all these vocabs are multiples of 64)."""
    assert vocab % 64 == 0 and vocab % tp == 0
    split = layers * (2 * q * h // tp + 2 * kv_rows * h + 3 * inter * h // tp + extra_split) + 2 * vocab // tp * h
    replicated = layers * (2 * h + extra_replicated) + h
    return {"split_bytes": split * BF16, "replicated_bytes": replicated * BF16}


def _ranks(summary: dict) -> list[dict]:
    return [{k: r[k] for k in ("split_bytes", "replicated_bytes")} for r in summary["ranks"]]


def test_llama3_70b_bf16_at_tp8():
    summary = rl.inspect_config(LLAMA3_70B, tp=8)
    assert summary["bytes"] == 70_553_706_496 * BF16 and len(summary["tensors"]) == 723
    assert summary["served_tp"] == [1, 2, 4, 8] and "refused" not in summary
    # 8 kv heads over 8 ranks: one head (128 rows) each for k and v
    expected = _dense_rank_params(8192, 80, 8192, 128, 28672, 128256, 8)
    assert _ranks(summary) == [expected] * 8
    assert summary["ranks"][0]["bytes"] == 17_640_734_720  # 17.64 GB per GPU


@pytest.mark.parametrize("tp", [4, 8])
def test_qwen3_30b_a3b_at_tp4_and_tp8(tp):
    summary = rl.inspect_config(QWEN3_30B_A3B, tp=tp)
    assert summary["bytes"] == 30_532_122_624 * BF16 and len(summary["tensors"]) == 18_867
    # 4 kv heads: 1 head per rank at tp=4; at tp=8 each head is replicated on 2 ranks (a rank still holds 1 head)
    experts = 128 * 3 * 768 * 2048 // tp
    expected = _dense_rank_params(2048, 48, 4096, 128, 0, 151936, tp, extra_split=experts,
                                  extra_replicated=128 * 2048 + 2 * 128)  # router, q_norm, k_norm
    assert _ranks(summary) == [expected] * tp


def test_mixtral_8x7b_at_tp8():
    summary = rl.inspect_config(MIXTRAL_8X7B, tp=8)
    assert summary["bytes"] == 46_702_792_704 * BF16 and len(summary["tensors"]) == 995
    expected = _dense_rank_params(4096, 32, 4096, 128, 8 * 14336, 32000, 8, extra_replicated=8 * 4096)
    assert _ranks(summary) == [expected] * 8


def _fp8(rows: int, cols: int, split_rows: int = 1, split_cols: int = 1, block: int = 128) -> int:
    """Bytes one rank keeps of an FP8 [rows, cols] weight cut split_rows x split_cols ways, with its float32
    weight_scale_inv: one value per block of the rank's slice (a partial last block counts whole)."""
    r, c = rows // split_rows, cols // split_cols
    return r * c + -(-r // block) * -(-c // block) * 4


def test_deepseek_v3_fp8_is_sized_per_rank():
    """DeepSeek-V3 (MLA, 256 experts, FP8 128x128 blocks) at tp=8, checked against its config by hand: q_b/kv_b
    cut by heads, o_proj and down projections on dim 1, latent projections and routers replicated, every
    weight_scale_inv cut with its weight in whole blocks."""
    summary = rl.inspect_config(DEEPSEEK_V3, tp=8)
    tensors = {t["name"]: t for t in summary["tensors"]}
    assert summary["quantization"] == "fp8 blocks [128, 128]"
    kv_a = "model.layers.3.self_attn.kv_a_proj_with_mqa.weight"
    assert tensors[kv_a]["dtype"] == "float8_e4m3fn" and tensors[kv_a]["shape"] == [576, 7168]
    assert tensors[f"{kv_a}_scale_inv"] == {**tensors[f"{kv_a}_scale_inv"], "dtype": "float32", "shape": [5, 56]}
    assert not tensors["model.layers.3.mlp.gate.weight"]["dtype"].startswith("float8")  # routers stay unquantized
    assert 671e9 < summary["bytes"] < 700e9  # 671B parameters, nearly all at one byte
    assert "multi-token-prediction" in summary["notes"][0]
    assert summary["served_tp"] == [1, 2, 4, 8] and "refused" not in summary
    tp, h, layers, dense, moe_layers, experts = 8, 7168, 61, 3, 58, 256 + 1  # + 1 shared expert
    split = (
        layers * (_fp8(128 * 192, 1536, tp) + _fp8(128 * 256, 512, tp) + _fp8(h, 128 * 128, 1, tp))  # q_b kv_b o
        + dense * (2 * _fp8(18432, h, tp) + _fp8(h, 18432, 1, tp))
        + moe_layers * experts * (2 * _fp8(2048, h, tp) + _fp8(h, 2048, 1, tp))
        + 2 * 129280 // tp * h * BF16  # embed_tokens, lm_head
    )
    replicated = (
        layers * (_fp8(1536, h) + _fp8(576, h) + (1536 + 512 + 2 * h) * BF16)  # q_a, kv_a_with_mqa, 4 norms
        + moe_layers * (256 * h + 256) * 4  # router (transformers builds it in float32) + e_score_correction_bias
        + h * BF16
    )
    assert _ranks(summary) == [{"split_bytes": split, "replicated_bytes": replicated}] * tp
    assert summary["ranks"][0]["bytes"] == 85_352_991_776  # 85.35 GB per GPU


def test_deepseek_v3_fp8_tp_that_splits_a_block_is_refused_naming_tensor_and_working_tps():
    """At tp=32 the dense MLP's 18432 rows give 576 per rank = 4.5 blocks of 128: refused, as vLLM refuses it."""
    summary = rl.inspect_config({**DEEPSEEK_V3, "num_hidden_layers": 4, "num_nextn_predict_layers": 0}, tp=32)
    assert "ranks" not in summary
    assert summary["refused"].startswith(
        "cannot publish with max_tp=32: model.layers.0.mlp.down_proj.weight: segment 'all' would be cut into 576 rows "
        "of dim 1 per rank at tp=32, which splits its 128-row quantization blocks; "
    )
    assert summary["refused"].endswith("pass --max-tp 16 (max_tp values up to 32 that work: [1, 2, 4, 8, 16])")


def test_fp8_block_scales_of_qwen3_fp8_are_cut_with_their_weights(tmp_path, capsys):
    """Qwen3-FP8's layout (block-quantized linear layers, bf16 embeddings and norms) at tp=8, per rank by hand."""
    config = {**LLAMA3_70B, "model_type": "qwen3", "num_hidden_layers": 2, "head_dim": 128,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["inspect", "--config-only", str(path), "--tp", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    h, tp, layers = 8192, 8, 2
    split = layers * (
        _fp8(8192, h, tp) + 2 * _fp8(1024, h, tp) + _fp8(h, 8192, 1, tp)  # q, k and v (one kv head each), o
        + 2 * _fp8(28672, h, tp) + _fp8(h, 28672, 1, tp)
    ) + 2 * 128256 // tp * h * BF16
    replicated = layers * (2 * h + 2 * 128) * BF16 + h * BF16  # layernorms, q_norm/k_norm, final norm
    assert _ranks(summary) == [{"split_bytes": split, "replicated_bytes": replicated}] * tp
    scale = next(t for t in summary["tensors"] if t["name"] == "model.layers.0.self_attn.k_proj.weight_scale_inv")
    assert (scale["shape"], scale["style"], scale["chunks"]) == ([8, 64], "colwise", 8)  # one 128-row block per head


def test_cli_config_only_prints_per_rank_bytes_and_refuses_a_tp(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_70B))
    assert main(["inspect", "--config-only", str(path), "--tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "723 tensors, 141.11 GB, max_tp 8, serves tp [1, 2, 4, 8]" in out
    assert len(re.findall(r"^ +[0-7] +17\.64 GB +17\.64 GB +2\.64 MB +723$", out, re.M)) == 8  # rank rows
    assert main(["inspect", "--config-only", str(path), "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "q_proj.weight" in err and "64 q heads" in err and "cannot be split across tp=3" in err
    assert main(["inspect", "--config-only", str(path), "file:///x", "--model", "m"]) == 2


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gemma"])
def test_config_only_matches_the_published_model(tmp_path, model_type):
    """The same per-rank bytes and chunk counts as inspect of a real publish (MoE experts; tied embeddings)."""
    ckpt = make_tiny_checkpoint(model_type, tmp_path / "ckpt", dtype=torch.bfloat16)
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=4)
    published = rl.inspect(url, "m", tp=4)
    sized = rl.inspect_config(ckpt / "config.json", tp=4, max_tp=4)
    fields = ("dtype", "shape", "style", "dim", "chunks", "bytes")
    assert {t["name"]: {k: t[k] for k in fields} for t in sized["tensors"]} == {
        t["name"]: {k: t[k] for k in fields} for t in published["tensors"]
    }
    keys = ("rank", "bytes", "split_bytes", "replicated_bytes", "reads")
    assert [{k: r[k] for k in keys} for r in sized["ranks"]] == [{k: r[k] for k in keys} for r in published["ranks"]]
    assert sized["served_tp"] == published["served_tp"] and sized["bytes"] == published["bytes"]


def test_deepseek_v3_fp8_at_ep8_holds_an_eighth_of_the_experts_whole():
    """DeepSeek-V3 with expert parallelism 8 (vLLM: tp=8 with enable_expert_parallel): each rank holds 32 of the
    256 routed experts of every MoE layer whole (no cut inside them), and the rest as at tp=8 (the shared expert
    too). By hand from the config, as the tp=8 test."""
    summary = rl.inspect_config(DEEPSEEK_V3, ep=8)
    tp, h, layers, dense, moe_layers = 8, 7168, 61, 3, 58
    assert summary["tp"] == tp and summary["ep"] == 8 and "refused" not in summary
    split = (
        layers * (_fp8(128 * 192, 1536, tp) + _fp8(128 * 256, 512, tp) + _fp8(h, 128 * 128, 1, tp))
        + dense * (2 * _fp8(18432, h, tp) + _fp8(h, 18432, 1, tp))
        + moe_layers * (2 * _fp8(2048, h, tp) + _fp8(h, 2048, 1, tp))  # the shared expert, TP
        + moe_layers * 256 // 8 * (2 * _fp8(2048, h) + _fp8(h, 2048))  # 32 routed experts, whole
        + 2 * 129280 // tp * h * BF16
    )
    replicated = (
        layers * (_fp8(1536, h) + _fp8(576, h) + (1536 + 512 + 2 * h) * BF16)
        + moe_layers * (256 * h + 256) * 4
        + h * BF16
    )
    assert _ranks(summary) == [{"split_bytes": split, "replicated_bytes": replicated}] * 8
    # an eighth of the expert bytes either way (each expert's 2048 rows cut in whole 128-blocks at tp=8): EP=8
    # moves as many bytes as tp=8, but as 32 whole experts (the cut vLLM's EP keeps) instead of slices of 256
    assert summary["ranks"][0]["bytes"] == 85_352_991_776
