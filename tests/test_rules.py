"""Sharding rules against the real tensor names transformers writes, plus the YAML and error surface."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raydist_loader.errors import ConfigError, ManifestError, ShardingError
from raydist_loader.store.presets import PRESETS
from raydist_loader.store.rules import ModelDims, Rule, RuleSet, Segment, TensorRule
from raydist_loader.testing.tiny_models import TINY_DEFAULTS, make_tiny_checkpoint

Shapes = dict[str, tuple[int, ...]]

# (name suffix, style, dim, [(segment name, size, heads)]) for representative tensors of each tiny model.
# Sizes follow TINY_DEFAULTS: hidden 64, 8 heads / 2 kv heads (head_dim 8, or 16 where set), vocab 250.
_QKV = [("q", 64, "q"), ("k", 16, "kv"), ("v", 16, "kv")]  # fused, tiny GQA sizes
_LLAMA_EXPECT = [
    ("model.embed_tokens.weight", "vocab", 0, [("all", 250, "none")]),
    ("lm_head.weight", "vocab", 0, [("all", 250, "none")]),
    ("layers.0.self_attn.q_proj.weight", "colwise", 0, [("all", 64, "q")]),
    ("layers.0.self_attn.k_proj.weight", "colwise", 0, [("all", 16, "kv")]),
    ("layers.0.self_attn.v_proj.weight", "colwise", 0, [("all", 16, "kv")]),
    ("layers.0.self_attn.o_proj.weight", "rowwise", 1, [("all", 64, "q")]),
    ("layers.0.mlp.gate_proj.weight", "colwise", 0, [("all", 128, "none")]),
    ("layers.0.mlp.down_proj.weight", "rowwise", 1, [("all", 128, "none")]),
    ("layers.0.input_layernorm.weight", "replicate", None, []),
    ("model.norm.weight", "replicate", None, []),
]
_QWEN3_ATTN = [
    ("layers.0.self_attn.q_proj.weight", "colwise", 0, [("all", 128, "q")]),
    ("layers.0.self_attn.k_proj.weight", "colwise", 0, [("all", 32, "kv")]),
    ("layers.0.self_attn.o_proj.weight", "rowwise", 1, [("all", 128, "q")]),
    ("layers.0.self_attn.q_norm.weight", "replicate", None, []),
    ("layers.0.self_attn.k_norm.weight", "replicate", None, []),
]
_MOE_EXPERTS = [
    ("layers.0.mlp.experts.3.gate_proj.weight", "colwise", 0, [("all", 32, "none")]),
    ("layers.0.mlp.experts.3.up_proj.weight", "colwise", 0, [("all", 32, "none")]),
    ("layers.0.mlp.experts.3.down_proj.weight", "rowwise", 1, [("all", 32, "none")]),
    ("layers.0.mlp.gate.weight", "replicate", None, []),
]
_DEEPSEEK_EXPECT = [  # MLA: 8 heads of q 16+8 rows, k_nope+v 16+16, v 16; latent projections replicated
    ("layers.0.self_attn.kv_a_proj_with_mqa.weight", "replicate", None, []),
    ("layers.0.self_attn.kv_b_proj.weight", "colwise", 0, [("all", 256, "q")]),
    ("layers.0.self_attn.o_proj.weight", "rowwise", 1, [("all", 128, "q")]),
    ("layers.0.self_attn.kv_a_layernorm.weight", "replicate", None, []),
    ("layers.0.mlp.gate_proj.weight", "colwise", 0, [("all", 128, "none")]),  # first_k_dense_replace: dense
    ("layers.1.mlp.experts.3.up_proj.weight", "colwise", 0, [("all", 64, "none")]),
    ("layers.1.mlp.experts.3.down_proj.weight", "rowwise", 1, [("all", 64, "none")]),
    ("layers.1.mlp.shared_experts.gate_proj.weight", "colwise", 0, [("all", 64, "none")]),
    ("layers.1.mlp.shared_experts.down_proj.weight", "rowwise", 1, [("all", 64, "none")]),
    ("layers.1.mlp.gate.weight", "replicate", None, []),
]
EXPECT: dict[str, list] = {
    "deepseek_v2": _DEEPSEEK_EXPECT + [("layers.0.self_attn.q_proj.weight", "colwise", 0, [("all", 192, "q")])],
    "deepseek_v3": _DEEPSEEK_EXPECT
    + [
        ("layers.0.self_attn.q_a_proj.weight", "replicate", None, []),
        ("layers.0.self_attn.q_a_layernorm.weight", "replicate", None, []),
        ("layers.0.self_attn.q_b_proj.weight", "colwise", 0, [("all", 192, "q")]),
        ("layers.1.mlp.gate.e_score_correction_bias", "replicate", None, []),
    ],
    "llama": _LLAMA_EXPECT,
    "mistral": _LLAMA_EXPECT,
    "qwen2": _LLAMA_EXPECT
    + [
        ("layers.0.self_attn.q_proj.bias", "colwise", 0, [("all", 64, "q")]),
        ("layers.0.self_attn.k_proj.bias", "colwise", 0, [("all", 16, "kv")]),
    ],
    "qwen3": _QWEN3_ATTN,
    "gemma": [
        ("layers.0.self_attn.q_proj.weight", "colwise", 0, [("all", 128, "q")]),
        ("layers.0.self_attn.k_proj.weight", "colwise", 0, [("all", 16, "kv")]),
        ("layers.0.self_attn.o_proj.weight", "rowwise", 1, [("all", 128, "q")]),
        ("model.embed_tokens.weight", "vocab", 0, [("all", 250, "none")]),
    ],
    "phi3": [
        ("layers.0.self_attn.qkv_proj.weight", "colwise", 0, _QKV),
        ("layers.0.mlp.gate_up_proj.weight", "colwise", 0, [("gate", 128, "none"), ("up", 128, "none")]),
        ("layers.0.self_attn.o_proj.weight", "rowwise", 1, [("all", 64, "q")]),
        ("layers.0.mlp.down_proj.weight", "rowwise", 1, [("all", 128, "none")]),
    ],
    "gpt2": [
        ("wte.weight", "vocab", 0, [("all", 250, "none")]),
        ("wpe.weight", "replicate", None, []),
        ("h.0.attn.c_attn.weight", "colwise", 1, [("q", 64, "q"), ("k", 64, "kv"), ("v", 64, "kv")]),
        ("h.0.attn.c_attn.bias", "colwise", 0, [("q", 64, "q"), ("k", 64, "kv"), ("v", 64, "kv")]),
        ("h.0.attn.c_proj.weight", "rowwise", 0, [("all", 64, "q")]),
        ("h.0.attn.c_proj.bias", "replicate", None, []),
        ("h.0.mlp.c_fc.weight", "colwise", 1, [("all", 256, "none")]),
        ("h.0.mlp.c_fc.bias", "colwise", 0, [("all", 256, "none")]),
        ("h.0.mlp.c_proj.weight", "rowwise", 0, [("all", 256, "none")]),
        ("h.0.mlp.c_proj.bias", "replicate", None, []),
        ("h.0.ln_1.weight", "replicate", None, []),
        ("ln_f.bias", "replicate", None, []),
    ],
    "mixtral": [
        ("layers.1.block_sparse_moe.experts.2.w1.weight", "colwise", 0, [("all", 32, "none")]),
        ("layers.1.block_sparse_moe.experts.2.w3.weight", "colwise", 0, [("all", 32, "none")]),
        ("layers.1.block_sparse_moe.experts.2.w2.weight", "rowwise", 1, [("all", 32, "none")]),
        ("layers.0.block_sparse_moe.gate.weight", "replicate", None, []),
        ("layers.0.self_attn.k_proj.weight", "colwise", 0, [("all", 16, "kv")]),
    ],
    "qwen2_moe": _MOE_EXPERTS
    + [
        ("layers.0.mlp.shared_expert.gate_proj.weight", "colwise", 0, [("all", 64, "none")]),
        ("layers.0.mlp.shared_expert.down_proj.weight", "rowwise", 1, [("all", 64, "none")]),
        ("layers.0.mlp.shared_expert_gate.weight", "replicate", None, []),
        ("layers.0.self_attn.v_proj.bias", "colwise", 0, [("all", 16, "kv")]),
    ],
    "qwen3_moe": _MOE_EXPERTS + _QWEN3_ATTN,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Shapes]]:
    """Every tiny checkpoint, built once: model_type -> (config.json, {tensor name: shape})."""
    root = tmp_path_factory.mktemp("tiny")
    return {t: _read_checkpoint(make_tiny_checkpoint(t, root / t)) for t in TINY_DEFAULTS}


def _read_checkpoint(path: Path) -> tuple[dict, Shapes]:
    """(config, shapes) of a checkpoint as written, read through safetensors' own header parser."""
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes


def _resolve_checkpoint(checkpoint: tuple[dict, Shapes]) -> dict[str, TensorRule]:
    """Resolve every tensor of a checkpoint with the preset its config names."""
    config, shapes = checkpoint
    return RuleSet.for_checkpoint(config).resolve_all(shapes, ModelDims.from_config(config))


def _one(names: Sequence[str], suffix: str) -> str:
    """The single tensor name ending in ``.suffix`` (or equal to it)."""
    found = [n for n in names if n == suffix or n.endswith("." + suffix)]
    assert len(found) == 1, f"{suffix}: {found}"
    return found[0]


def _described(rule: TensorRule) -> tuple[str, int | None, list[tuple[str, int, str]]]:
    """A TensorRule as plain tuples, to compare with the EXPECT table."""
    return rule.style, rule.dim, [(s.name, s.size, s.heads) for s in rule.segments]


def _llama_dims() -> ModelDims:
    """The tiny llama's dims (8 heads, 2 kv heads, head_dim 8)."""
    return ModelDims.from_config({**TINY_DEFAULTS["llama"], "model_type": "llama"})


# ---------------------------------------------------------------------------------------------------------
# Presets on real checkpoints


def test_every_preset_has_a_tiny_model() -> None:
    assert set(PRESETS) == set(TINY_DEFAULTS) == set(EXPECT)
    assert list(PRESETS) == sorted(PRESETS)  # one entry per model_type, in order


@pytest.mark.parametrize("model_type", sorted(TINY_DEFAULTS))
def test_preset_resolves_every_tensor(model_type: str, checkpoints: dict) -> None:
    _, shapes = checkpoints[model_type]
    resolved = _resolve_checkpoint(checkpoints[model_type])
    assert resolved.keys() == shapes.keys()
    for name, rule in resolved.items():
        shape = shapes[name]
        if rule.style == "replicate":
            assert rule.dim is None and rule.segments == (), name
            continue
        assert sum(s.size for s in rule.segments) == shape[rule.dim], name
        for seg in rule.segments:
            assert seg.size % seg.unit == 0 and seg.units * seg.unit == seg.size, name


@pytest.mark.parametrize("model_type", sorted(TINY_DEFAULTS))
def test_preset_styles_of_representative_tensors(model_type: str, checkpoints: dict) -> None:
    resolved = _resolve_checkpoint(checkpoints[model_type])
    for suffix, style, dim, segments in EXPECT[model_type]:
        assert _described(resolved[_one(list(resolved), suffix)]) == (style, dim, segments), suffix


@pytest.mark.parametrize("model_type", ["gemma", "gpt2"])
def test_tied_models_write_no_lm_head(model_type: str, checkpoints: dict) -> None:
    _, shapes = checkpoints[model_type]
    assert not any(n.endswith("lm_head.weight") for n in shapes)


def test_head_units_follow_config_head_dim(checkpoints: dict) -> None:
    resolved = _resolve_checkpoint(checkpoints["gemma"])
    q = resolved["model.layers.0.self_attn.q_proj.weight"].segments[0]
    k = resolved["model.layers.0.self_attn.k_proj.weight"].segments[0]
    assert (q.unit, q.units) == (16, 8)
    assert (k.unit, k.units) == (16, 1)  # multi-query: one kv head


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_fused_3d_experts_in_memory(model_type: str) -> None:
    """transformers 5.x keeps experts fused in memory ([E, 2I, H] / [E, H, I]); the presets cut those too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY_DEFAULTS[model_type], "num_hidden_layers": 1})
    shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    resolved = RuleSet.preset(model_type).resolve_all(shapes, ModelDims.from_config(config.to_dict()))
    gate_up = resolved[_one(list(shapes), "mlp.experts.gate_up_proj")]
    down = resolved[_one(list(shapes), "mlp.experts.down_proj")]
    inter = shapes[_one(list(shapes), "mlp.experts.down_proj")][2]
    assert _described(gate_up) == ("colwise", 1, [("gate", inter, "none"), ("up", inter, "none")])
    assert _described(down) == ("rowwise", 2, [("all", inter, "none")])


# ---------------------------------------------------------------------------------------------------------
# Matching


def test_patterns_are_anchored_suffixes() -> None:
    rules = RuleSet.preset("llama")
    dims = _llama_dims()
    for name in ("foo.q_proj.weight_extra", "foo.xq_proj.weight", "q_proj.weight.bak", "foo.q_proj_weight"):
        assert rules.match(name) is None, name
        with pytest.raises(ShardingError, match="match no sharding rule"):
            rules.resolve(name, (64, 64), dims)
    assert rules.resolve("q_proj.weight", (64, 64), dims).style == "colwise"  # whole name


def test_unmatched_tensors_are_all_listed() -> None:
    shapes = {f"extra.t{i:02d}.weight": (4,) for i in range(25)} | {"model.norm.weight": (64,)}
    with pytest.raises(ShardingError) as err:
        RuleSet.preset("llama").resolve_all(shapes, _llama_dims())
    msg = str(err.value)
    assert "25 tensor(s)" in msg and "extra.t00.weight" in msg and "extra.t19.weight" in msg
    assert "extra.t20.weight" not in msg and "and 5 more" in msg
    assert "default: replicate" in msg and "model.norm.weight" not in msg


def test_default_replicate() -> None:
    rules = RuleSet.from_yaml({"default": "replicate"}, base=RuleSet.preset("llama"))
    assert rules.resolve("vision.patch_embed.weight", (4, 4), _llama_dims()).style == "replicate"
    assert rules.resolve("model.layers.0.mlp.up_proj.weight", (128, 64), _llama_dims()).style == "colwise"


def test_rowwise_bias_replicates_colwise_bias_splits() -> None:
    rules, dims = RuleSet.preset("llama"), _llama_dims()
    assert rules.resolve("a.o_proj.bias", (64,), dims).style == "replicate"
    assert _described(rules.resolve("a.q_proj.bias", (64,), dims)) == ("colwise", 0, [("all", 64, "q")])


def test_wrong_head_sizes_name_the_tensor() -> None:
    rules = RuleSet.preset("llama")
    with pytest.raises(ShardingError, match=r"a\.k_proj\.weight \[24, 64\].*2x8 = 16, got 24"):
        rules.resolve("a.k_proj.weight", (24, 64), _llama_dims())
    with pytest.raises(ShardingError, match=r"\[90, 64\].*q=64 \+ k=16 \+ v=16 = 96, got 90"):
        RuleSet.preset("phi3").resolve("a.qkv_proj.weight", (90, 64), _llama_dims())


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("a.q_proj.weight_scale", (64,), ("colwise", 0, [("all", 64, "q")])),
        ("a.q_proj.weight_scale", (64, 1), ("colwise", 0, [("all", 64, "q")])),
        ("a.qkv_proj.weight_scale", (96, 1), ("colwise", 0, _QKV)),
        ("a.o_proj.weight_scale", (64,), ("replicate", None, [])),
        ("a.q_proj.input_scale", (), ("replicate", None, [])),
        ("a.self_attn.k_scale", (1,), ("replicate", None, [])),
    ],
)
def test_quantisation_scales_follow_their_weight(name: str, shape: tuple[int, ...], expected: tuple) -> None:
    rules = RuleSet.preset("phi3")  # phi3 = fused qkv + the llama rules
    assert _described(rules.resolve(name, shape, _llama_dims())) == expected


def _fp8_dims(block: list[int] | None = (16, 16), **config: object) -> ModelDims:
    """The tiny llama's dims, FP8 block-quantized with ``block`` (as quantization_config.weight_block_size)."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block) if block else None}
    return ModelDims.from_config({**TINY_DEFAULTS["llama"], "model_type": "llama", "quantization_config": quant,
                                  **config})


@pytest.mark.parametrize(
    ("weight", "shape", "scale_shape", "style", "dim", "block"),
    [
        ("a.q_proj.weight", (64, 64), (4, 4), "colwise", 0, 16),
        ("a.o_proj.weight", (64, 64), (4, 4), "rowwise", 1, 16),
        ("a.down_proj.weight", (64, 200), (4, 13), "rowwise", 1, 16),  # 200 = 12.5 blocks: the scale rounds up
    ],
)
def test_block_scales_follow_their_weight_in_blocks(weight, shape, scale_shape, style, dim, block) -> None:
    """A block-quantized weight's segments carry the block; its weight_scale_inv has the same segments (in the
    weight's rows) and block_scale = the block along the split dim, so the grid cuts both in the same place."""
    shapes = {weight: shape, f"{weight}_scale_inv": scale_shape}
    resolved = RuleSet.preset("llama").resolve_all(shapes, _fp8_dims())
    w, s = resolved[weight], resolved[f"{weight}_scale_inv"]
    assert (w.style, w.dim, w.block_scale) == (style, dim, 1) and w.segments[0].block == block
    assert (s.style, s.dim, s.segments, s.block_scale) == (style, dim, w.segments, block)
    assert s.extent == scale_shape[dim] and TensorRule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_block_scale_of_a_replicated_weight_replicates() -> None:
    shapes = {"a.kv_a_proj_with_mqa.weight": (40, 64), "a.kv_a_proj_with_mqa.weight_scale_inv": (3, 4)}
    dims = _fp8_dims(**{**TINY_DEFAULTS["deepseek_v3"], "model_type": "deepseek_v3"})
    resolved = RuleSet.preset("deepseek_v3").resolve_all(shapes, dims)
    assert {r.style for r in resolved.values()} == {"replicate"}


@pytest.mark.parametrize(
    ("block", "scale_shape", "message"),
    [
        (None, (4, 4), r"a block scale needs quantization_config\.weight_block_size"),
        ((16, 16), (4, 2), r"\[4, 2\]: not a per-tensor.*block \[16, 16\]\) would be \[4, 4\]"),
        ((16, 16), (5, 1), r"\[5, 1\]: not a per-tensor, per-channel"),  # [out, 1]-shaped but not out rows
    ],
)
def test_scales_that_fit_no_layout_are_refused_naming_the_shapes(block, scale_shape, message) -> None:
    shapes = {"a.q_proj.weight": (64, 64), "a.q_proj.weight_scale_inv": scale_shape}
    with pytest.raises(ShardingError, match=message):
        RuleSet.preset("llama").resolve_all(shapes, _fp8_dims(block))


def test_block_quantized_vocab_and_misaligned_fused_segments_are_refused() -> None:
    with pytest.raises(ShardingError, match=r"lm_head\.weight \[250, 64\]: a block-quantized vocab tensor"):
        RuleSet.preset("llama").resolve_all({"lm_head.weight": (250, 64), "lm_head.weight_scale_inv": (16, 4)},
                                            _fp8_dims())
    fused = {"a.qkv_proj.weight": (96, 64), "a.qkv_proj.weight_scale_inv": (3, 2)}  # q=64 k=16 v=16, block 32
    with pytest.raises(ShardingError, match=r"q=64 \+ k=16 \+ v=16 do not start on whole 32-row quantization"):
        RuleSet.preset("phi3").resolve_all(fused, _fp8_dims((32, 32)))


def test_compressed_tensors_block_structure_is_read() -> None:
    group = {"weights": {"strategy": "block", "block_structure": [32, 64]}, "targets": ["Linear"]}
    config = {**TINY_DEFAULTS["llama"], "quantization_config": {"quant_method": "compressed-tensors",
                                                                "config_groups": {"group_0": group}}}
    assert ModelDims.from_config(config).quant_block == (32, 64)
    with pytest.raises(ConfigError, match=r"weight_block_size must be two positive integers"):
        _fp8_dims((16, 0))


# ---------------------------------------------------------------------------------------------------------
# YAML


def test_yaml_overrides_beat_the_preset(tmp_path: Path) -> None:
    text = "rules:\n  - {pattern: 'q_proj\\.weight$', style: replicate}\n"
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    config = {**TINY_DEFAULTS["llama"], "model_type": "llama"}
    for source in (text, path, str(path), {"rules": [{"pattern": r"q_proj\.weight$", "style": "replicate"}]}):
        rules = RuleSet.for_checkpoint(config, source)
        assert rules.resolve("a.q_proj.weight", (64, 64), _llama_dims()).style == "replicate"
        assert rules.resolve("a.k_proj.weight", (16, 64), _llama_dims()).style == "colwise"
        assert rules.default == "error"


def test_yaml_fused_rule_and_transposed() -> None:
    rules = RuleSet.from_yaml(
        "default: replicate\nrules:\n"
        "  - {pattern: 'fused$', style: colwise, segments: [q, k, v], transposed: true}\n"
        "  - {pattern: 'w13$', style: colwise, segments: 'a, b'}\n"
    )
    dims = _llama_dims()
    assert _described(rules.resolve("x.fused", (64, 96), dims))[:2] == ("colwise", 1)
    halves = [("a", 5, "none"), ("b", 5, "none")]
    assert _described(rules.resolve("x.w13", (10, 64), dims)) == ("colwise", 0, halves)


def test_user_rules_for_a_type_without_preset() -> None:
    rules = RuleSet.for_checkpoint({"model_type": "mamba"}, {"default": "replicate"})
    assert rules.resolve("anything", (3,), _llama_dims()).style == "replicate"
    assert RuleSet.for_checkpoint({"model_type": "llama"}, rules) is rules  # a RuleSet is taken as is


def _one_rule(**fields: object) -> dict:
    """A rules document with one colwise rule on pattern 'a', ``fields`` changed."""
    return {"rules": [{"pattern": "a", "style": "colwise", **fields}]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"rules": [{"pattern": "a", "style": "colwise"}] * 2 + [{"pattern": "b", "style": "colwize"}]},
            "rules[2].style: 'colwize' is not one of colwise|rowwise|vocab|replicate",
        ),
        (_one_rule(head="q"), "rules[0].head: unknown key"),
        (_one_rule(heads="k"), "rules[0].heads: 'k' is not one of q|kv|none"),
        ({"rules": [{"style": "colwise"}]}, "rules[0].pattern: required"),
        (_one_rule(pattern="("), "rules[0].pattern: '(' is not a valid regular expression"),
        (_one_rule(style="vocab", segments=["q", "k"]), "rules[0].segments: only colwise/rowwise"),
        (_one_rule(segments=["q", "q"]), "rules[0].segments: ['q', 'q'] must be 2+ distinct"),
        (_one_rule(segments=["q", "k", "v"], heads="q"), "rules[0].heads: a fused rule takes no heads"),
        (_one_rule(transposed="yes!"), "rules[0].transposed: 'yes!' is not true or false"),
        ({"rules": ["a: colwise"]}, "rules[0]: expected a mapping"),
        ({"rules": {"pattern": "a"}}, "rules: expected a list"),
        ({"default": "skip"}, "default: 'skip' is not one of error|replicate"),
        ({"defaults": "replicate"}, "defaults: unknown key"),
        ("rules: [", "invalid YAML"),
        ("- just a list", "must be a mapping"),
    ],
)
def test_yaml_errors_give_dotted_paths(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RuleSet.from_yaml(doc)
    assert message in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - {pattern: a, style: sideways}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: rules\[0\]\.style: 'sideways'"):
        RuleSet.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read rules file"):
        RuleSet.from_yaml(tmp_path / "missing.yaml")


def test_rule_validates_in_python_too() -> None:
    with pytest.raises(ConfigError, match="style: 'colwize' is not one of"):
        Rule("a", "colwize")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="default: 'skip'"):
        RuleSet([], default="skip")  # type: ignore[arg-type]


def test_unknown_model_type_lists_presets() -> None:
    with pytest.raises(ConfigError) as err:
        RuleSet.preset("mamba")
    assert "'mamba'" in str(err.value) and "llama" in str(err.value) and "qwen3_moe" in str(err.value)
    assert "rules" in str(err.value)
    with pytest.raises(ConfigError, match="missing model_type"):
        RuleSet.for_checkpoint({"hidden_size": 8})


# ---------------------------------------------------------------------------------------------------------
# Dims


def test_model_dims_aliases_and_defaults() -> None:
    gpt2 = ModelDims.from_config({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "vocab_size": 250})
    assert gpt2 == ModelDims("gpt2", 64, 4, 4, 16, 250)
    gemma = ModelDims.from_config({**TINY_DEFAULTS["gemma"], "model_type": "gemma"})
    assert (gemma.head_dim, gemma.kv_heads) == (16, 1)
    null_head_dim = {"hidden_size": 64, "num_attention_heads": 8, "head_dim": None}
    assert ModelDims.from_config(null_head_dim).head_dim == 8


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"num_attention_heads": 8}, "hidden_size or n_embd"),
        ({"hidden_size": 64}, "num_attention_heads or n_head"),
        ({"hidden_size": 64, "num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 3}, "not a multiple"),
    ],
)
def test_model_dims_errors_name_the_key(config: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ModelDims.from_config(config)


# ---------------------------------------------------------------------------------------------------------
# Recording


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "qwen2_moe"])
def test_tensor_rule_round_trip(model_type: str, checkpoints: dict) -> None:
    for rule in _resolve_checkpoint(checkpoints[model_type]).values():
        data = json.loads(json.dumps(rule.to_dict()))
        assert TensorRule.from_dict(data) == rule


def test_tensor_rule_from_dict_rejects_garbage() -> None:
    good = TensorRule("colwise", 0, (Segment("all", 64, "q", 8),)).to_dict()
    for bad in (
        {**good, "style": "sideways"},
        {**good, "dim": None},
        {"style": "colwise"},
        {**good, "segments": [{"name": "all", "size": 60, "heads": "q", "unit": 8}]},
    ):
        with pytest.raises(ManifestError):
            TensorRule.from_dict(bad)


def test_fingerprint_is_stable_and_semantic() -> None:
    llama = RuleSet.preset("llama")
    assert llama.fingerprint() == RuleSet.preset("llama").fingerprint()
    assert llama.fingerprint() == RuleSet.preset("mistral").fingerprint()  # same rules, other label
    recorded = json.loads(json.dumps(llama.to_dict()))
    assert recorded["name"] == "llama"
    reread = RuleSet.from_yaml(recorded)
    assert reread.fingerprint() == llama.fingerprint() and reread.to_dict() == llama.to_dict()
    assert RuleSet.from_yaml({"default": "replicate"}, base=llama).fingerprint() != llama.fingerprint()
    assert RuleSet.preset("phi3").fingerprint() != llama.fingerprint()
    assert len(llama.fingerprint()) == 64


def test_tiny_checkpoint_files(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "m", dtype=torch.bfloat16, num_key_value_heads=4)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not (path / "tokenizer.json").read_bytes().isascii()
    config, shapes = _read_checkpoint(path)
    assert config["num_key_value_heads"] == 4 and shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert config["vocab_size"] % 64 != 0
