"""Aside (testing, imported by no product module): Tiny random checkpoints written by transformers itself, for tests,
the demo and benchmarks.

Nothing can be downloaded here, so every model is built from its config class (``AutoConfig.for_model``) with
random weights and saved with ``save_pretrained``: tensor names, shapes, dtypes and file layout are exactly
what transformers writes for that ``model_type``, which is what the sharding presets must match.

Names transformers 5.24 writes (``model.safetensors``, one file):

* llama/mistral/qwen2/qwen3/gemma: ``model.layers.N.self_attn.{q,k,v,o}_proj.weight`` (qwen2 also
  ``{q,k,v}_proj.bias``; qwen3 also ``self_attn.{q,k}_norm.weight``), ``mlp.{gate,up,down}_proj.weight``,
  ``*layernorm.weight``, ``model.norm.weight``, ``model.embed_tokens.weight``, ``lm_head.weight`` (gemma is
  tied: no ``lm_head.weight``).
* phi3: ``self_attn.qkv_proj.weight`` ([q; k; v] with GQA sizes), ``mlp.gate_up_proj.weight`` ([gate; up]).
* gpt2: ``transformer.{wte,wpe}.weight``, ``transformer.h.N.attn.c_attn.{weight,bias}`` (Conv1D, [in, 3*out]),
  ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_{1,2,f}``; tied, so no ``lm_head.weight``.
* mixtral: per expert ``block_sparse_moe.experts.E.{w1,w2,w3}.weight`` and the router
  ``block_sparse_moe.gate.weight`` (in memory transformers fuses experts into 3-D ``mlp.experts.gate_up_proj``
  [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]; ``save_pretrained`` converts back to these names).
* qwen2_moe/qwen3_moe: ``mlp.experts.E.{gate,up,down}_proj.weight``, router ``mlp.gate.weight``; qwen2_moe
  also ``mlp.shared_expert.{gate,up,down}_proj.weight`` and ``mlp.shared_expert_gate.weight`` ([1, hidden]).
* deepseek_v2/deepseek_v3: ``self_attn.{q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj}.weight`` (v2-lite:
  ``q_proj`` instead of q_a/q_b), ``self_attn.{q_a,kv_a}_layernorm.weight``; dense ``mlp.{gate,up,down}_proj`` in
  the first layer, then ``mlp.experts.E.*_proj``, ``mlp.shared_experts.*_proj``, ``mlp.gate.weight`` (v3 also
  ``mlp.gate.e_score_correction_bias``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Shared by every decoder-only type: tiny, GQA (8 query heads over 2 kv heads), and a vocab that is not a
# multiple of 64 so that vLLM's vocab padding (and short last ranks) is exercised. Token ids are in the vocab.
_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 250,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE_EXPERTS: dict[str, Any] = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# DeepSeek: MLA (8 heads of qk 16+8, v 16; latent ranks 32), one dense layer then MoE (4 routed + 1 shared expert)
_DEEPSEEK: dict[str, Any] = {
    **_COMMON,
    "num_key_value_heads": 8,  # MLA: k and v have a head per q head
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 64,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}

TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {**_DEEPSEEK, "q_lora_rank": None},  # DeepSeek-V2-Lite: a plain q_proj
    "deepseek_v3": {**_DEEPSEEK, "q_lora_rank": 32},  # q_a_proj -> q_b_proj; router bias e_score_correction_bias
    "llama": _COMMON,
    "mistral": _COMMON,
    "qwen2": _COMMON,
    # head_dim 16 != hidden / heads (8): the rules must take head_dim from the config.
    "qwen3": {**_COMMON, "head_dim": 16},
    # Multi-query attention (one kv head, as gemma-2b) and an explicit head_dim; embeddings tied.
    "gemma": {**_COMMON, "head_dim": 16, "num_key_value_heads": 1},
    "phi3": _COMMON,
    "gpt2": {
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 250,
        "n_positions": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "mixtral": {**_COMMON, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_COMMON, **_MOE_EXPERTS, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**_COMMON, **_MOE_EXPERTS, "head_dim": 16},
}
"""Config overrides per ``model_type`` for :func:`make_tiny_checkpoint`; the keys are the supported types."""

# Hidden sizes make_big_llama tries, largest first (head_dim 64, or hidden / 8 below 512: always >= 8 heads).
_BIG_HIDDEN_SIZES = (4096, 2048, 1024, 512, 256, 128, 64)

# A small but valid WordLevel tokenizer (the ``tokenizers`` library loads it). Non-ASCII entries make sure
# that files are moved as bytes, not re-encoded text.
_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "héllo", "wörld", "世界", "🙂", "the", "a"]


def make_tiny_checkpoint(
    model_type: str,
    dest: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``model_type`` checkpoint (safetensors + config + tokenizer files) to ``dest``.

    ``config_overrides`` replace the per-type defaults in :data:`TINY_DEFAULTS` (e.g.
    ``num_key_value_heads=4``). The same ``seed`` gives the same weights. Returns ``dest`` as a
    :class:`~pathlib.Path`.
    """
    if model_type not in TINY_DEFAULTS:
        known = ", ".join(sorted(TINY_DEFAULTS))
        raise ValueError(f"no tiny defaults for model_type {model_type!r}; known: {known}")
    return _save_random_model(
        model_type, dest, dtype, seed, {**TINY_DEFAULTS[model_type], **config_overrides}
    )


def make_big_llama(dest: str | Path, target_bytes: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random Llama-shaped checkpoint of roughly ``target_bytes`` to ``dest`` (demo and benchmarks).

    The shape is chosen like a real Llama (see :func:`big_llama_config`): the largest hidden size that still
    leaves at least four layers, GQA with up to 8 kv heads, head_dim 64, vocab 32000, untied ``lm_head``.
    Small targets keep 8 heads (head_dim hidden / 8), so every size publishes at the default max_tp 8.
    Targets below about 10 MB give the smallest shape (about 8 MB in bf16).
    """
    config = big_llama_config(target_bytes, torch.tensor([], dtype=dtype).element_size())
    return _save_random_model("llama", dest, dtype, 0, config)


#: A Qwen3-30B-A3B-shaped MoE at tiny sizes: its 48 layers x 128 experts give the real model's 18,867 tensor
#: names (and 74,553 chunks at max_tp 4) in about 40 MB of bf16, so per-tensor costs, not bytes, decide its timings.
MANY_TENSORS_MOE: dict[str, Any] = {"num_experts": 128, "num_hidden_layers": 48, "moe_intermediate_size": 16}


def make_many_tensor_moe(dest: str | Path) -> Path:
    """Write the :data:`MANY_TENSORS_MOE` checkpoint (transformers ``qwen3_moe``, bf16, hidden 64) to ``dest``."""
    return make_tiny_checkpoint("qwen3_moe", dest, dtype=torch.bfloat16, **MANY_TENSORS_MOE)


def big_llama_config(target_bytes: int, element_size: int = 2) -> dict[str, Any]:
    """Llama config overrides whose checkpoint comes closest to ``target_bytes``."""
    vocab = 32000
    for hidden in _BIG_HIDDEN_SIZES:
        shape = _llama_shape(hidden, vocab)
        layers = (target_bytes / element_size - shape["fixed"]) / shape["per_layer"]
        if layers >= 4 or hidden == _BIG_HIDDEN_SIZES[-1]:
            return _llama_config(hidden, vocab, max(1, round(layers)))
    raise AssertionError("unreachable: the last hidden size always returns")


def _llama_shape(hidden: int, vocab: int) -> dict[str, int]:
    """Parameter counts of a Llama of this hidden size: ``fixed`` (embeddings, norm) and ``per_layer``."""
    heads, kv_heads, inter = _llama_dims(hidden)
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * (hidden // heads)
    return {"fixed": 2 * vocab * hidden + hidden, "per_layer": attn + 3 * hidden * inter + 2 * hidden}


def _llama_dims(hidden: int) -> tuple[int, int, int]:
    """(heads, kv heads, intermediate size) for ``hidden``: head_dim 64 but at least 8 heads (so that max_tp 8
    cuts every size), and Llama's 8/3 MLP ratio."""
    heads = max(8, hidden // 64)
    return heads, min(heads, 8), 256 * math.ceil(8 * hidden / 3 / 256)


def _llama_config(hidden: int, vocab: int, layers: int) -> dict[str, Any]:
    """Config overrides for a Llama with the given hidden size, vocab and layer count."""
    heads, kv_heads, inter = _llama_dims(hidden)
    return {
        **_COMMON,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }


def _save_random_model(
    model_type: str, dest: str | Path, dtype: torch.dtype, seed: int, config_kwargs: dict[str, Any]
) -> Path:
    """Build ``model_type`` from its config class with random weights and save it, plus tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(dest)
    config = AutoConfig.for_model(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with _quiet_progress():
        model.save_pretrained(dest, safe_serialization=True)
    write_tokenizer_files(dest)
    return dest


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar while saving; restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def write_tokenizer_files(dest: str | Path) -> None:
    """Write a small hand-made ``tokenizer.json`` + ``tokenizer_config.json`` (valid for ``tokenizers``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    special = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(_TOKENS[:4])
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {tok: i for i, tok in enumerate(_TOKENS)},
            "unk_token": "<unk>",
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 128,
    }
    _write_json(dest / "tokenizer.json", tokenizer)
    _write_json(dest / "tokenizer_config.json", config)


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON, non-ASCII characters kept (the bytes are not pure ASCII)."""
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
