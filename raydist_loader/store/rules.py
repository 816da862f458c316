"""Layer 2 (store): Tensor-parallel sharding rules: which dim of each tensor is split, and into which segments.

A :class:`RuleSet` is an ordered list of :class:`Rule` (regex on the tensor name -> style), first match wins.
Presets per config.json ``model_type`` are data in :mod:`.presets` (in the rules-YAML form, read through the
same validation as user rules); user rules from YAML go in front of a preset and so override it.
Resolving a tensor name + shape against the model's :class:`ModelDims` gives a :class:`TensorRule`: the style,
the split dim of *this* tensor and its segments (``[q; k; v]``, ``[gate; up]`` or one ``all``), which is what
the chunk grid, the plans and the manifest are built from. The cuts follow vLLM's parallel layers
(ColumnParallelLinear, RowParallelLinear, QKVParallelLinear, VocabParallelEmbedding) so that the shards are
what an engine expects.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ..errors import ConfigError, ManifestError, ShardingError
from .presets import PRESETS, QKV

Style = Literal["colwise", "rowwise", "vocab", "replicate"]
Heads = Literal["q", "kv", "none"]
Default = Literal["error", "replicate"]

STYLES: tuple[str, ...] = get_args(Style)
HEADS: tuple[str, ...] = get_args(Heads)
DEFAULTS: tuple[str, ...] = get_args(Default)

_SEGMENT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # chunk names are "<tensor>::<segment>.<index>"
# quantisation tensors that follow their module's weight: weight_scale_inv (FP8 blocks), weight_scale / input_scale
# (compressed-tensors, per channel or per tensor), k_scale / v_scale, weight_zero_point
_SCALE_NAME = re.compile(r"^(?P<module>.+)\.(?P<kind>\w*_(scale(_inv|_2)?|zero_point))$")
_MAX_LISTED = 20


# --------------------------------------------------------------------------------------------------------
# Model dimensions


@dataclass(frozen=True)
class ModelDims:
    """The config.json numbers that decide where heads start and end, and the FP8 block size.

    ``mla_head_dims`` are the other sizes a q-head-structured dim may have in multi-head latent attention
    (DeepSeek: q_b_proj holds heads of qk_nope+qk_rope rows, kv_b_proj of qk_nope+v, o_proj's input of v).
    ``quant_block`` is ``[B0, B1]`` of block-quantized weights (``quantization_config.weight_block_size``, or a
    compressed-tensors ``block_structure``): their scales hold one value per B0 x B1 block of the weight.
    """

    model_type: str
    hidden: int
    n_heads: int
    kv_heads: int
    head_dim: int
    vocab: int | None
    mla_head_dims: tuple[int, ...] = ()
    quant_block: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelDims:
        """Read the dims from a config.json dict, accepting GPT-2's aliases (``n_embd``, ``n_head``).

        ``head_dim`` comes from the config when present (gemma, qwen3: it need not be hidden / heads), else
        hidden // heads; ``kv_heads`` is ``num_key_value_heads`` or, without GQA, the number of heads.
        """
        hidden = _config_int(config, "hidden_size", "n_embd")
        n_heads = _config_int(config, "num_attention_heads", "n_head")
        kv_heads = _config_int(config, "num_key_value_heads", default=n_heads)
        head_dim = _config_int(config, "head_dim", default=hidden // n_heads)
        vocab = _config_int(config, "vocab_size", default=0) or None
        if n_heads % kv_heads:
            raise ConfigError(
                f"config: num_attention_heads ({n_heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        return cls(
            str(config.get("model_type", "")), hidden, n_heads, kv_heads, head_dim, vocab, _mla_head_dims(config),
            quant_block(config),
        )


def _mla_head_dims(config: Mapping[str, Any]) -> tuple[int, ...]:
    """Multi-head latent attention's head sizes (config has ``kv_lora_rank``), else ()."""
    if config.get("kv_lora_rank") is None:
        return ()
    nope, rope, v = (_config_int(config, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    return tuple(dict.fromkeys((nope + rope, nope + v, v)))


def quant_block(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """``[B0, B1]`` of a block-quantized checkpoint (FP8 ``weight_block_size``, or the ``block_structure`` of a
    compressed-tensors group with ``strategy: block``), None when its weights are not block-quantized."""
    quant = config.get("quantization_config") or {}
    if not isinstance(quant, Mapping):
        raise ConfigError(f"config: quantization_config must be a mapping, got {quant!r}")
    where, block = "quantization_config.weight_block_size", quant.get("weight_block_size")
    groups = quant.get("config_groups") if isinstance(quant.get("config_groups"), Mapping) else {}
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if block is None and isinstance(weights, Mapping) and weights.get("strategy") == "block":
            where, block = f"quantization_config.config_groups.{name}.weights.block_structure", weights.get(
                "block_structure"
            )
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_positive_int(b) for b in block)):
        raise ConfigError(f"config: {where} must be two positive integers [rows, cols], got {block!r}")
    return int(block[0]), int(block[1])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of ``keys`` present in ``config`` (a positive int), else ``default``."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config: {key} must be a positive integer, got {value!r}")
        return value
    if default is None:
        raise ConfigError(f"config: missing {' or '.join(keys)} (needed to cut tensors on head boundaries)")
    return default


# --------------------------------------------------------------------------------------------------------
# Resolved rules (what the manifest records per tensor)


@dataclass(frozen=True)
class Segment:
    """One contiguous part of a split dim (a fused tensor has several) and how it may be cut.

    ``block`` > 1 marks a block-quantized weight: a rank's cut must fall on whole quantization blocks of that many
    rows (columns) along the split dim, as vLLM requires (``validate_fp8_block_shape``).
    """

    name: str
    size: int
    heads: Heads
    unit: int
    block: int = 1

    @property
    def units(self) -> int:
        """How many cutting units (heads for q/kv, elements for none) the segment holds."""
        return self.size // self.unit

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``block`` only when the segment is block-quantized)."""
        out = {"name": self.name, "size": self.size, "heads": self.heads, "unit": self.unit}
        return out | ({"block": self.block} if self.block != 1 else {})


@dataclass(frozen=True)
class TensorRule:
    """How one tensor is cut: style, split dim of this tensor, and its segments in order along that dim.

    ``block_scale`` > 1 marks the scale of a block-quantized weight (``weight_scale_inv``): its segments are its
    weight's, and index ``i`` of its split dim stands for the weight's rows ``[i * block_scale, (i + 1) *
    block_scale)``, so the grid cuts it exactly where it cuts the weight, divided by the block.
    """

    style: Style
    dim: int | None
    segments: tuple[Segment, ...]
    block_scale: int = 1

    @property
    def extent(self) -> int:
        """The size of the split dim the segments describe (a block scale's is its weight's, in blocks)."""
        return -(-sum(s.size for s in self.segments) // self.block_scale)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as recorded in the manifest."""
        out = {"style": self.style, "dim": self.dim, "segments": [s.to_dict() for s in self.segments]}
        return out | ({"block_scale": self.block_scale} if self.block_scale != 1 else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorRule:
        """Inverse of :meth:`to_dict`; a garbled dict raises :class:`ManifestError` naming the field."""
        try:
            segments = tuple(
                Segment(str(s["name"]), int(s["size"]), s["heads"], int(s["unit"]), int(s.get("block", 1)))
                for s in d["segments"]
            )
            dim = None if d["dim"] is None else int(d["dim"])
            rule = cls(d["style"], dim, segments, int(d.get("block_scale", 1)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"tensor rule {dict(d)!r}: missing or bad field ({exc})") from exc
        _check_tensor_rule(rule)
        return rule


def _check_tensor_rule(rule: TensorRule) -> None:
    """Reject a TensorRule whose fields contradict each other (read back from an untrusted manifest)."""
    if rule.style not in STYLES:
        raise ManifestError(f"tensor rule style {rule.style!r} is not one of {'|'.join(STYLES)}")
    if (rule.style == "replicate") != (rule.dim is None) or (rule.style == "replicate") != (
        not rule.segments
    ):
        raise ManifestError(
            f"tensor rule {rule.to_dict()}: a split style needs a dim and segments, replicate neither"
        )
    for seg in rule.segments:
        if seg.heads not in HEADS or seg.size < 0 or seg.unit <= 0 or seg.size % seg.unit or seg.block < 1:
            raise ManifestError(f"tensor rule {rule.to_dict()}: bad segment {seg.to_dict()}")
    if rule.block_scale < 1 or (rule.block_scale > 1 and rule.style not in ("colwise", "rowwise")):
        raise ManifestError(f"tensor rule {rule.to_dict()}: block_scale needs a colwise/rowwise rule")


_REPLICATE = TensorRule("replicate", None, ())


# --------------------------------------------------------------------------------------------------------
# User / preset rules


class _RuleFieldError(ConfigError):
    """A bad field of one :class:`Rule`; ``from_yaml`` prefixes the field with the rule's dotted path."""

    def __init__(self, field_name: str, detail: str):
        super().__init__(f"{field_name}: {detail}")
        self.field_name = field_name
        self.detail = detail


@dataclass(frozen=True)
class Rule:
    """One rule: tensors whose name matches ``pattern`` (``re.search``) are cut this way.

    ``segments`` names the parts of a fused tensor in order (``("q","k","v")`` with GQA sizes, or equal parts
    such as ``("gate","up")``); ``()`` means one segment ``all``. ``heads`` says whether the split dim is cut
    on q-head or kv-head boundaries (unfused tensors only: a fused q,k,v carries its own). ``transposed``
    marks GPT-2's Conv1D, whose weights are stored ``[in, out]``.
    """

    pattern: str
    style: Style
    heads: Heads = "none"
    segments: tuple[str, ...] = ()
    transposed: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "_regex", _compile(self.pattern))
        _check_choice("style", self.style, STYLES)
        _check_choice("heads", self.heads, HEADS)
        if not isinstance(self.transposed, bool):
            raise _RuleFieldError("transposed", f"{self.transposed!r} is not true or false")
        self._check_segments()

    def _check_segments(self) -> None:
        """Fused segments: 2+ distinct lowercase names, split styles only, no rule-level heads."""
        segs = self.segments
        if not segs:
            return
        if self.style not in ("colwise", "rowwise"):
            raise _RuleFieldError("segments", f"only colwise/rowwise tensors can be fused, not {self.style}")
        bad = [s for s in segs if not isinstance(s, str) or not _SEGMENT_NAME.match(s) or s == "all"]
        if bad or len(set(segs)) != len(segs) or len(segs) < 2:
            raise _RuleFieldError(
                "segments",
                f"{list(segs)!r} must be 2+ distinct lowercase names other than "
                "'all', e.g. [q, k, v] or [gate, up]",
            )
        if self.heads != "none":
            raise _RuleFieldError(
                "heads",
                "a fused rule takes no heads: q,k,v segments carry q/kv heads "
                "themselves, other segments are cut as plain dims",
            )

    def matches(self, name: str) -> bool:
        """Whether this rule applies to the tensor ``name``."""
        return self._regex.search(name) is not None

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able form (every field, fixed order)."""
        return {
            "pattern": self.pattern,
            "style": self.style,
            "heads": self.heads,
            "segments": list(self.segments),
            "transposed": self.transposed,
        }


def _compile(pattern: Any) -> re.Pattern[str]:
    """Compile a rule's regex, turning a bad one into a ConfigError on the ``pattern`` field."""
    if not isinstance(pattern, str) or not pattern:
        raise _RuleFieldError("pattern", f"{pattern!r} is not a non-empty regular expression string")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise _RuleFieldError("pattern", f"{pattern!r} is not a valid regular expression: {exc}") from exc


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``field: 'value' is not one of a|b|c`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise _RuleFieldError(field_name, f"{value!r} is not one of {'|'.join(choices)}")


# --------------------------------------------------------------------------------------------------------
# Applying a rule to one tensor


def _split_dim(rule: Rule, ndim: int) -> int | None:
    """The dim a colwise/rowwise rule splits on an ``ndim``-dim tensor; None: replicate (rowwise bias)."""
    if ndim == 1:
        return 0 if rule.style == "colwise" else None  # vLLM adds a row-parallel bias on one rank only
    out_dim, in_dim = ndim - 2, ndim - 1  # Linear [..., out, in]; fused experts [E, out, in]
    if rule.transposed:
        out_dim, in_dim = in_dim, out_dim  # Conv1D [in, out]
    return out_dim if rule.style == "colwise" else in_dim


def _apply(
    rule: Rule, name: str, shape: tuple[int, ...], dims: ModelDims, block: tuple[int, int] | None = None
) -> TensorRule:
    """Turn a matching rule into the TensorRule of this tensor, checking sizes against the model dims.

    ``block`` is the quantization block of a block-quantized weight: its segments then carry the block along the
    split dim, so that the grid cuts it (and its scale) on whole blocks only."""
    if rule.style == "replicate":
        return _REPLICATE
    if not shape:
        raise ShardingError(
            f"{name} {list(shape)}: rule {rule.pattern!r} ({rule.style}) cannot split a scalar; "
            "give it a replicate rule"
        )
    if rule.style == "vocab":
        if block:
            raise ShardingError(
                f"{name} {list(shape)}: a block-quantized vocab tensor cannot be cut the way vLLM pads the vocab "
                "(vLLM never quantizes embeddings or lm_head); give it a replicate rule"
            )
        return TensorRule("vocab", 0, (Segment("all", shape[0], "none", 1),))
    dim = _split_dim(rule, len(shape))
    if dim is None:
        return _REPLICATE
    segments = _segments(rule, shape[dim], dims)
    _check_sizes(rule, name, shape, dim, segments, dims)
    if block:
        segments = _blocked(name, shape, dim, segments, block)
    return TensorRule(rule.style, dim, segments)


def _segments(rule: Rule, size: int, dims: ModelDims) -> tuple[Segment, ...]:
    """The segments of a split dim of ``size``: one ``all``, q,k,v with GQA sizes, or equal named parts."""
    if not rule.segments:
        return (Segment("all", size, rule.heads, _head_unit(rule.heads, size, dims)),)
    if rule.segments == QKV:
        q, kv = dims.n_heads * dims.head_dim, dims.kv_heads * dims.head_dim
        return (
            Segment("q", q, "q", dims.head_dim),
            Segment("k", kv, "kv", dims.head_dim),
            Segment("v", kv, "kv", dims.head_dim),
        )
    part = size // len(rule.segments)
    return tuple(Segment(s, part, "none", 1) for s in rule.segments)


def _head_unit(heads: Heads, size: int, dims: ModelDims) -> int:
    """Rows per head of a head-structured dim: head_dim, or an MLA head size when the dim holds that many heads."""
    if heads == "none":
        return 1
    if heads == "q" and size % dims.n_heads == 0 and size // dims.n_heads in dims.mla_head_dims:
        return size // dims.n_heads
    return dims.head_dim


def _blocked(
    name: str, shape: tuple[int, ...], dim: int, segments: tuple[Segment, ...], block: tuple[int, int]
) -> tuple[Segment, ...]:
    """The segments of a block-quantized weight (block ``[B0, B1]`` over its last two dims) with the block along
    ``dim``; fused segments must start on whole blocks, or the scale could not be cut per segment."""
    size = block[0] if dim == len(shape) - 2 else block[1]
    starts = list(itertools.accumulate(s.size for s in segments))[:-1]
    if any(start % size for start in starts):
        layout = " + ".join(f"{s.name}={s.size}" for s in segments)
        raise ShardingError(
            f"{name} {list(shape)}: fused segments {layout} do not start on whole {size}-row quantization blocks, "
            "so its block scale cannot be cut per segment (vLLM refuses such a merged layer too)"
        )
    return tuple(dataclasses.replace(s, block=size) for s in segments)


def block_scale_shape(weight_shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale of a block-quantized weight: one value per ``B0 x B1`` block of its last two dims."""
    *lead, rows, cols = weight_shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _check_sizes(
    rule: Rule, name: str, shape: tuple[int, ...], dim: int, segments: tuple[Segment, ...], dims: ModelDims
) -> None:
    """Segments must tile the split dim exactly, and head-structured segments must hold whole heads."""
    where = f"{name} {list(shape)} (rule {rule.pattern!r}, {rule.style} on dim {dim})"
    layout = " + ".join(f"{s.name}={s.size}" for s in segments)
    if sum(s.size for s in segments) != shape[dim]:
        raise ShardingError(
            f"{where}: expected dim {dim} = {layout} = {sum(s.size for s in segments)}, "
            f"got {shape[dim]}; {_dims_text(dims)}"
        )
    for seg in segments:
        expected = {"q": dims.n_heads, "kv": dims.kv_heads}.get(seg.heads)
        if expected is not None and seg.size != expected * seg.unit:
            raise ShardingError(
                f"{where}: segment {seg.name} should hold {seg.heads} heads x head_dim = "
                f"{expected}x{seg.unit} = {expected * seg.unit}, got {seg.size}; "
                f"{_dims_text(dims)}"
            )


def _dims_text(dims: ModelDims) -> str:
    """The model dims, for error messages."""
    return (
        f"model: heads={dims.n_heads}, kv_heads={dims.kv_heads}, head_dim={dims.head_dim}, "
        f"hidden={dims.hidden}"
    )


def _block_scaled(shapes: Mapping[str, tuple[int, ...]], dims: ModelDims) -> set[str]:
    """The weights that have a block scale (``weight_scale_inv``, or compressed-tensors' 2-D ``weight_scale``) of
    the shape ``dims.quant_block`` gives them: these are cut on whole blocks, and their scales with them."""
    if dims.quant_block is None:
        return set()
    out = set()
    for name, shape in shapes.items():
        match = _SCALE_NAME.match(name)
        if match is None or match.group("kind") not in ("weight_scale_inv", "weight_scale"):
            continue
        weight = shapes.get(f"{match.group('module')}.weight")
        if weight is not None and len(weight) >= 2 and shape == block_scale_shape(weight, dims.quant_block):
            out.add(f"{match.group('module')}.weight")
    return out


def _scale_error(
    name: str, shape: tuple[int, ...], weight: str, weight_shape: tuple[int, ...] | None,
    block: tuple[int, int] | None,
) -> str:
    """Why a scale cannot follow its weight, with the shapes that would."""
    if weight_shape is None:
        expected = f"its weight {weight} is not in the checkpoint"
    elif block is None:
        expected = (
            f"{weight} is {list(weight_shape)}; a block scale needs quantization_config.weight_block_size in "
            "config.json"
        )
    else:
        expected = (
            f"{weight} is {list(weight_shape)}, so its block scale (block {list(block)}) would be "
            f"{list(block_scale_shape(weight_shape, block))}"
        )
    return (
        f"{name} {list(shape)}: not a per-tensor, per-channel ([out] or [out, 1]) or block quantisation scale of "
        f"its weight ({expected}); add an explicit rule for it (e.g. style: replicate)"
    )


# --------------------------------------------------------------------------------------------------------
# Rule sets


class RuleSet:
    """Ordered rules (first match wins) plus what to do with a tensor no rule matches."""

    def __init__(self, rules: Sequence[Rule], *, default: Default = "error", name: str = "custom"):
        if default not in DEFAULTS:
            raise ConfigError(f"default: {default!r} is not one of {'|'.join(DEFAULTS)}")
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.default: Default = default
        self.name = name

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, {len(self.rules)} rules, default={self.default!r})"

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, model_type: str) -> RuleSet:
        """The built-in rules for a config.json ``model_type``."""
        if model_type not in PRESETS:
            raise ConfigError(
                f"no sharding preset for model_type {model_type!r}; presets exist for "
                f"{', '.join(sorted(PRESETS))}. Pass your own rules (YAML: rules: [{{pattern, "
                "style, heads, segments, transposed}]) to load other models."
            )
        return cls(_preset_rules(model_type), name=model_type)

    @classmethod
    def from_yaml(cls, source: str | Path | Mapping[str, Any], *, base: RuleSet | None = None) -> RuleSet:
        """Rules from YAML (a file path, YAML text or a parsed dict), placed before ``base``'s rules.

        Format: ``{default: replicate|error, rules: [{pattern, style, heads, segments, transposed}]}``
        (``name`` is accepted too, so that :meth:`to_dict` output reads back). Errors give the dotted path of
        the bad key.
        """
        doc, origin = _load_yaml(source)
        try:
            return _ruleset_from_doc(doc, base)
        except ConfigError as exc:
            raise ConfigError(f"{origin}{exc}") from None

    @classmethod
    def for_checkpoint(
        cls, config: Mapping[str, Any], user: RuleSet | str | Path | Mapping[str, Any] | None = None
    ) -> RuleSet:
        """The rules to publish a checkpoint with: the preset for ``config["model_type"]`` with ``user`` rules
        (YAML) in front, or the user rules alone for a type without a preset. A RuleSet is taken as is."""
        if isinstance(user, RuleSet):
            return user
        model_type = config.get("model_type")
        if user is not None and model_type not in PRESETS:
            return cls.from_yaml(user)
        if not isinstance(model_type, str):
            raise ConfigError("config: missing model_type (needed to pick the sharding preset); pass rules")
        preset = cls.preset(model_type)
        return preset if user is None else cls.from_yaml(user, base=preset)

    # -- resolution ---------------------------------------------------------------------------------------

    def match(self, name: str) -> Rule | None:
        """The first rule matching ``name``, or None."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def resolve(
        self, name: str, shape: Sequence[int], dims: ModelDims, shapes: Mapping[str, Sequence[int]] | None = None
    ) -> TensorRule:
        """How to cut tensor ``name`` of ``shape``; unmatched raises unless ``default: replicate``.

        ``shapes`` (the checkpoint's other tensors) is needed to tell a block-quantized weight or its block scale.
        """
        all_shapes = {n: tuple(s) for n, s in (shapes or {}).items()} | {name: tuple(shape)}
        resolved = self._resolve(name, tuple(shape), dims, all_shapes, _block_scaled(all_shapes, dims))
        if resolved is None:
            raise self._unmatched_error([name])
        return resolved

    def resolve_all(self, shapes: Mapping[str, Sequence[int]], dims: ModelDims) -> dict[str, TensorRule]:
        """Resolve every tensor; all unmatched tensors are reported together in one ShardingError."""
        shapes = {n: tuple(s) for n, s in shapes.items()}
        blocked = _block_scaled(shapes, dims)
        resolved: dict[str, TensorRule] = {}
        unmatched: list[str] = []
        for name, shape in shapes.items():
            rule = self._resolve(name, shape, dims, shapes, blocked)
            if rule is None:
                unmatched.append(name)
            else:
                resolved[name] = rule
        if unmatched:
            raise self._unmatched_error(unmatched)
        return resolved

    def _resolve(
        self, name: str, shape: tuple[int, ...], dims: ModelDims, shapes: Mapping[str, tuple[int, ...]],
        blocked: set[str],
    ) -> TensorRule | None:
        """Rule lookup: explicit rule, else a quantisation scale following its weight, else the default."""
        rule = self.match(name)
        if rule is not None:
            return _apply(rule, name, shape, dims, dims.quant_block if name in blocked else None)
        scale = _SCALE_NAME.match(name)
        if scale is not None:
            resolved = self._resolve_scale(name, scale.group("module"), shape, dims, shapes, blocked)
            if resolved is not None:
                return resolved
        return _REPLICATE if self.default == "replicate" else None

    def _resolve_scale(
        self, name: str, module: str, shape: tuple[int, ...], dims: ModelDims, shapes: Mapping[str, tuple[int, ...]],
        blocked: set[str],
    ) -> TensorRule | None:
        """A quantisation scale follows its weight: a scalar replicates; a block scale (``[ceil(out/B0),
        ceil(in/B1)]``) is cut where its weight is, in whole blocks; a per-output-channel one ([out] or [out, 1])
        is cut like its weight's bias would be (colwise -> dim 0 with the same segments, rowwise -> replicate:
        a row-parallel rank keeps every output channel)."""
        if math.prod(shape) <= 1:
            return _REPLICATE
        weight_name = f"{module}.weight"
        weight_rule = self.match(weight_name)
        if weight_rule is None:
            return None
        weight_shape = shapes.get(weight_name)
        if weight_name in blocked and dims.quant_block and shape == block_scale_shape(weight_shape, dims.quant_block):
            weight = _apply(weight_rule, weight_name, weight_shape, dims, dims.quant_block)
            if weight.dim is None:
                return _REPLICATE
            return TensorRule(weight.style, weight.dim, weight.segments, weight.segments[0].block)
        out_dim = None if weight_shape is None else len(weight_shape) - (1 if weight_rule.transposed else 2)
        per_channel = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        if per_channel and (out_dim is None or out_dim < 0 or shape[0] == weight_shape[out_dim]):
            return _apply(weight_rule, name, shape[:1], dims)  # 1-D: dim 0 for colwise/vocab, rowwise replicates
        raise ShardingError(_scale_error(name, shape, weight_name, weight_shape, dims.quant_block))

    def _unmatched_error(self, names: list[str]) -> ShardingError:
        """The error for tensors no rule matches: lists them and says how to fix it."""
        shown = "\n  ".join(names[:_MAX_LISTED])
        more = f"\n  ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
        return ShardingError(
            f"{len(names)} tensor(s) match no sharding rule of {self.name!r}:\n  {shown}{more}\n"
            "Add a rule for them (rules: [{pattern: '(^|\\.)name\\.weight$', "
            "style: replicate|colwise|rowwise|vocab}]) or set `default: replicate` in the rules YAML to "
            "replicate every unmatched tensor."
        )

    # -- recording ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able form, recorded in the manifest (``from_yaml`` reads it back)."""
        return {"name": self.name, "default": self.default, "rules": [r.to_dict() for r in self.rules]}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of what decides the cuts (``default`` and ``rules``).

        The ``name`` label is left out on purpose: the llama preset and the same rules read back from a
        manifest cut identically and must compare equal.
        """
        semantic = {k: v for k, v in self.to_dict().items() if k != "name"}
        canonical = json.dumps(semantic, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------
# YAML parsing

_TOP_KEYS = ("name", "default", "rules")
_RULE_KEYS = ("pattern", "style", "heads", "segments", "transposed")


def _load_yaml(source: str | Path | Mapping[str, Any]) -> tuple[Any, str]:
    """Parse ``source`` -> (document, prefix for error messages naming the file)."""
    if isinstance(source, Mapping):
        return source, ""
    if isinstance(source, Path) or _looks_like_path(source):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read rules file {path}: {exc.strerror or exc}") from None
        return _parse_yaml(text, f"{path}: "), f"{path}: "
    return _parse_yaml(source, ""), ""


def _looks_like_path(text: str) -> bool:
    """A one-line string ending in .yaml/.yml or naming an existing file is a path, else YAML text."""
    if "\n" in text:
        return False
    return text.endswith((".yaml", ".yml")) or Path(text).is_file()


def _parse_yaml(text: str, origin: str) -> Any:
    """YAML text -> object, with syntax errors as ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}invalid YAML: {exc}") from None


def _ruleset_from_doc(doc: Any, base: RuleSet | None) -> RuleSet:
    """Validate a parsed rules document and build the RuleSet (user rules first, then ``base``'s)."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError(
            f"rules document must be a mapping with keys {', '.join(_TOP_KEYS)}, got {type(doc).__name__}"
        )
    _check_keys(doc, _TOP_KEYS, "")
    raw_rules = doc.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(f"rules: expected a list of rules, got {type(raw_rules).__name__}")
    rules = [_rule_from_mapping(item, f"rules[{i}]") for i, item in enumerate(raw_rules)]
    default = doc.get("default", base.default if base else "error")
    if default not in DEFAULTS:
        raise ConfigError(f"default: {default!r} is not one of {'|'.join(DEFAULTS)}")
    name = doc.get("name") or (f"{base.name}+user" if base else "custom")
    return RuleSet([*rules, *(base.rules if base else ())], default=default, name=str(name))


def _rule_from_mapping(item: Any, path: str) -> Rule:
    """One YAML rule -> :class:`Rule`; every error names ``path.field``."""
    if not isinstance(item, Mapping):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(_RULE_KEYS)}, got {item!r}")
    _check_keys(item, _RULE_KEYS, f"{path}.")
    for key in ("pattern", "style"):
        if key not in item:
            raise ConfigError(f"{path}.{key}: required")
    segments = item.get("segments") or ()
    if isinstance(segments, str):
        segments = [s.strip() for s in segments.split(",")]
    if not isinstance(segments, (list, tuple)):
        raise ConfigError(f"{path}.segments: expected a list such as [q, k, v], got {segments!r}")
    try:
        return Rule(
            item["pattern"],
            item["style"],
            item.get("heads", "none"),
            tuple(segments),
            item.get("transposed", False),
        )
    except _RuleFieldError as exc:
        raise ConfigError(f"{path}.{exc.field_name}: {exc.detail}") from None


@functools.cache
def _preset_rules(model_type: str) -> tuple[Rule, ...]:
    """The preset of ``model_type`` (rules-YAML form in :mod:`.presets`) as validated :class:`Rule` objects."""
    specs = PRESETS[model_type]
    return tuple(_rule_from_mapping(spec, f"presets[{model_type!r}][{i}]") for i, spec in enumerate(specs))


def _check_keys(mapping: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    """Reject keys outside ``known``, naming the first unknown one with its dotted path."""
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(known)})")
