"""Layer 2 (store): Sharding presets: the built-in rules for each config.json ``model_type``, as data.

Layer: data only (imports nothing from the package). Each preset is an ordered list of rules written exactly
like a user's rules YAML (``{pattern, style, heads, segments, transposed}``), so :mod:`raydist_loader.store.rules`
validates and applies presets and user rules through one path. Patterns are anchored name suffixes: a rule
never matches part of a name component. To add a model: compose its entry from the blocks below, add a tiny
config for it in ``raydist_loader/testing/tiny_models.py`` and its expected cuts in ``tests/test_rules.py``.
"""

from __future__ import annotations

from typing import Any

RuleSpec = dict[str, Any]
"""One rule in the rules-YAML form: ``{pattern, style, heads, segments, transposed}``."""

QKV: tuple[str, ...] = ("q", "k", "v")  # a fused q,k,v: segment sizes from the model's (GQA) heads
GATE_UP: tuple[str, ...] = ("gate", "up")  # a fused gate,up: two equal parts


def _suffix(
    regex: str, style: str, heads: str = "none", segments: tuple[str, ...] = (), transposed: bool = False
) -> RuleSpec:
    """A rule on the last name components: ``regex`` must start at a component boundary and end the name."""
    return {
        "pattern": rf"(^|\.){regex}$",
        "style": style,
        "heads": heads,
        "segments": list(segments),
        "transposed": transposed,
    }


_WB = r"\.(weight|bias)"
# input_layernorm, post_attention_layernorm, model.norm, q_norm/k_norm, ...
_NORMS = (_suffix(r"\w*norm" + _WB, "replicate"),)
_VOCAB = (_suffix(r"embed_tokens\.weight", "vocab"), _suffix(r"lm_head\.weight", "vocab"))
_ATTENTION = (
    _suffix(r"q_proj" + _WB, "colwise", "q"),
    _suffix(r"(k|v)_proj" + _WB, "colwise", "kv"),
    _suffix(r"o_proj" + _WB, "rowwise", "q"),
)
_MLP = (  # also matches per-expert (experts.N.gate_proj) and shared-expert MLPs
    _suffix(r"(gate|up)_proj" + _WB, "colwise"),
    _suffix(r"down_proj" + _WB, "rowwise"),
)
_LLAMA = _VOCAB + _ATTENTION + _MLP + _NORMS

_FUSED_DENSE = (  # phi3
    _suffix(r"qkv_proj" + _WB, "colwise", segments=QKV),
    _suffix(r"gate_up_proj" + _WB, "colwise", segments=GATE_UP),
)
_ROUTERS = (
    _suffix(r"(mlp|block_sparse_moe)\.gate\.weight", "replicate"),
    _suffix(r"shared_expert_gate\.weight", "replicate"),
)
_FUSED_EXPERTS = (  # transformers 5.x in-memory 3-D experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    _suffix(r"experts\.gate_up_proj(\.weight)?", "colwise", segments=GATE_UP),
    _suffix(r"experts\.(gate|up)_proj", "colwise"),
    _suffix(r"experts\.down_proj", "rowwise"),
)
_MOE = _ROUTERS + _FUSED_EXPERTS
_MIXTRAL_EXPERTS = (
    _suffix(r"experts\.\d+\.w[13]\.weight", "colwise"),
    _suffix(r"experts\.\d+\.w2\.weight", "rowwise"),
)
_MLA = (  # DeepSeek multi-head latent attention, as vLLM's DeepseekV2Attention / MLA wrapper shards it
    _suffix(r"(q_a_proj|kv_a_proj_with_mqa)\.weight", "replicate"),  # low-rank projections: ReplicatedLinear
    _suffix(r"(q_b_proj|kv_b_proj)\.weight", "colwise", "q"),  # per q head (MLA head sizes from the config)
)
_DEEPSEEK_MOE = (
    _suffix(r"mlp\.gate\.(weight|e_score_correction_bias)", "replicate"),  # router and its bias (V3)
    _suffix(r"eh_proj\.weight", "replicate"),  # multi-token-prediction layer (nn.Linear in vLLM)
    _suffix(r"shared_head\.head\.weight", "vocab"),  # its lm head (ParallelLMHead); enorm/hnorm: the norm rule
)
_DEEPSEEK = _MLA + _DEEPSEEK_MOE + _LLAMA  # q_proj (no q_lora_rank) and o_proj; experts/shared_experts: _MLP
_GPT2 = (  # Conv1D weights are stored [in, out]: transposed
    _suffix(r"wte\.weight", "vocab"),
    _suffix(r"wpe\.weight", "replicate"),
    _suffix(r"attn\.c_attn" + _WB, "colwise", segments=QKV, transposed=True),
    _suffix(r"attn\.c_proj" + _WB, "rowwise", "q", transposed=True),
    _suffix(r"mlp\.c_fc" + _WB, "colwise", transposed=True),
    _suffix(r"mlp\.c_proj" + _WB, "rowwise", transposed=True),
    _suffix(r"attn\.(masked_)?bias", "replicate"),  # causal-mask buffers in older GPT-2 checkpoints
    _suffix(r"ln_\w+" + _WB, "replicate"),
    _suffix(r"lm_head\.weight", "vocab"),
)

PRESETS: dict[str, tuple[RuleSpec, ...]] = {
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,  # FP8 blocks as shipped: weight_scale_inv follows its weight (rules.py)
    "gemma": _LLAMA,  # head_dim from config; tied embeddings (no lm_head.weight written)
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _MIXTRAL_EXPERTS + _MOE + _LLAMA,  # block_sparse_moe.experts.N.w1/w3 colwise, w2 rowwise
    "phi3": _FUSED_DENSE + _LLAMA,
    "qwen2": _LLAMA,  # q/k/v biases: covered by the (weight|bias) suffixes
    "qwen2_moe": _MOE + _LLAMA,
    "qwen3": _LLAMA,  # q_norm/k_norm: covered by the norm rule; head_dim from config
    "qwen3_moe": _MOE + _LLAMA,
}
"""Rules per config.json ``model_type`` (sorted), first match wins; user rules go in front of them."""
