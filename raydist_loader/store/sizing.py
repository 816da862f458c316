"""Layer 2 (store): Size a deployment from a model's config.json alone (``inspect --config-only``): no weights,
no store.

The model is built by transformers on torch's ``meta`` device (shapes and dtypes, no memory), its state dict is
turned back into the names a checkpoint holds (the same reverse conversion ``save_pretrained`` applies: per-expert
names, tied embeddings dropped), FP8 block quantization from ``quantization_config`` is applied the way such
checkpoints ship it (weights ``float8_e4m3fn``, ``weight_scale_inv`` ``[ceil(out/B0), ceil(in/B1)]`` float32),
and then the same rules and chunk grid as ``publish`` cut it. Per-rank bytes are exactly what a load of the
published model moves; anything the rules or the grid refuse is reported, not raised.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import dtypes
from ..bulk import bulk
from ..errors import ConfigError, MissingDependencyError, RaydistError
from . import grid
from .experts import check_ep, linear, pull_whole
from .publish import DEFAULT_MAX_TP, plan_cuts
from .rules import RuleSet
from .safetensors_io import Entry

# 2-D weights FP8 checkpoints keep in the model dtype: embeddings, lm_head, MoE routers
_NOT_QUANTIZED = re.compile(r"(^|\.)(embed_tokens|lm_head|gate|shared_expert_gate)\.weight$")


@bulk
def inspect_config(
    config: str | Path | Mapping[str, Any],
    *,
    tp: int | None = None,
    max_tp: int | None = None,
    rules: str | Path | dict | None = None,
    name: str | None = None,
    ep: int | None = None,
) -> dict:
    """Per-rank bytes at ``tp`` (and what is refused) for the model a config.json describes, before publishing.

    ``config`` is a path to config.json or its dict; ``max_tp`` defaults to publish's 8 (``tp`` itself when
    ``tp`` does not divide 8, so the answer names the tensor that refuses it rather than the default).
    Returns the same shape of summary as :func:`raydist_loader.inspect` (``layout: config-only``), plus
    ``dtype``, ``quantization``, ``notes`` and, when something cannot be served, ``refused`` (the reason).
    ``ep``: per-rank bytes of that many expert-parallel ranks instead (a multiple of ``tp``, which defaults to it):
    each holds its routed experts whole (vLLM's linear placement), its other tensors as TP rank ``r % tp``.
    """
    if ep is not None:
        tp = tp or ep
        check_ep(ep, tp)
    config, where = _load(config)
    max_tp = max_tp or (DEFAULT_MAX_TP if tp is None or DEFAULT_MAX_TP % tp == 0 else tp)
    entries = meta_entries(config)
    summary: dict[str, Any] = {
        "store": where,
        "model": name or _model_name(config),
        "version": None,
        "layout": "config-only",
        "max_tp": max_tp,
        "served_tp": [],
        "bytes": sum(e.nbytes for e in entries),
        "digests": [],
        "rules": None,
        "dtype": _dtype_name(config),
        "quantization": _quantization(config),
        "notes": _notes(config),
        "files": [],
    }
    try:
        ruleset = RuleSet.for_checkpoint(config, rules)
        summary["rules"] = ruleset.name
        cuts = plan_cuts(entries, config, ruleset, max_tp)
    except RaydistError as e:
        summary["tensors"] = [_row(entry, None, 0) for entry in entries]
        summary["refused"] = str(e)
        return summary
    summary["tensors"] = [_row(c.entry, c.rule, len(c.chunks)) for c in cuts]
    refusals = _Refusals(cuts, max_tp)
    summary["served_tp"] = [t for t in range(1, max_tp + 1) if refusals.why(t) is None]
    if tp is not None:
        summary["tp"] = tp
        why = refusals.why(tp)
        if why:
            summary["refused"] = f"tp={tp}: {why}; served tp: {summary['served_tp']}"
        else:
            summary["ranks"] = _ranks(cuts, max_tp, tp, ep)
            if ep is not None:
                summary["ep"] = ep
    return summary


# ------------------------------------------------------------------------------------------ meta tensors
def meta_entries(config: Mapping[str, Any]) -> list[Entry]:
    """The tensors a checkpoint of this config holds (names, dtypes, shapes), built on the meta device."""
    state = _meta_state_dict(config)
    entries = [Entry(n, str(t.dtype).removeprefix("torch."), tuple(t.shape), 0, 0) for n, t in state.items()]
    entries = _fp8_blocks(entries, config)
    return [Entry(e.name, e.dtype, e.shape, 0, math.prod(e.shape) * dtypes.itemsize(e.dtype)) for e in entries]


def _meta_state_dict(config: Mapping[str, Any]) -> dict:
    import torch

    try:
        from transformers import AutoModelForCausalLM
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as e:
        raise MissingDependencyError(
            f"--config-only builds the model with transformers >= 5 ({e}): pip install 'raydist-loader[sizing]'"
        ) from None

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"config: model_type {model_type!r} is not known to the installed transformers, which builds the meta "
            "tensors; upgrade transformers or size the model by publishing it"
        )
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(dict(config))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtypes.torch_dtype(_dtype_name(config)))
        state = remove_tied_weights_from_state_dict(model.state_dict(), model)
        return revert_weight_conversion(model, state)  # the names save_pretrained writes (per-expert tensors)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"config: transformers cannot build a {model_type} causal LM from it: {e}") from None


def _fp8_blocks(entries: list[Entry], config: Mapping[str, Any]) -> list[Entry]:
    """FP8 block quantization as DeepSeek-V3 / Qwen3-FP8 ship it: each quantized 2-D weight becomes
    float8 plus a float32 ``weight_scale_inv`` of ``[ceil(out/B0), ceil(in/B1)]`` right after it."""
    quant = config.get("quantization_config")
    if not quant:
        return entries
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise ConfigError(
            f"config: quantization_config {quant.get('quant_method')!r} is not modelled by --config-only (it sizes "
            "unquantized checkpoints and FP8 block quantization: quant_method fp8 with weight_block_size)"
        )
    fp8 = "float8_e5m2" if quant.get("fmt") == "e5m2" else "float8_e4m3fn"
    skip = [m for m in quant.get("modules_to_not_convert") or [] if m]
    out = []
    for e in entries:
        quantized = fp8_quantized(e.name, e.shape) and e.dtype != "float32" and not any(m in e.name for m in skip)
        if not quantized:
            out.append(e)
            continue
        out.append(Entry(e.name, fp8, e.shape, 0, 0))
        scale = tuple(-(-size // b) for size, b in zip(e.shape, block, strict=True))
        out.append(Entry(f"{e.name}_scale_inv", "float32", scale, 0, 0))
    return out


def fp8_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether FP8 checkpoints quantize this tensor: 2-D linear weights, except embeddings, lm_head and routers."""
    return len(shape) == 2 and name.endswith(".weight") and not _NOT_QUANTIZED.search(name)


# ------------------------------------------------------------------------------------------ per rank
class _Refusals:
    """Why a tp cannot be served (None when it can), computed once per distinct (rule, shape)."""

    def __init__(self, cuts, max_tp: int):
        self._max_tp = max_tp
        self._kinds: dict[tuple, str] = {}
        for c in cuts:
            self._kinds.setdefault((c.rule, c.entry.shape), c.entry.name)  # named by its first tensor

    def why(self, tp: int) -> str | None:
        for (rule, shape), name in self._kinds.items():
            reason = grid.refusal(rule, shape, self._max_tp, tp)
            if reason:
                return f"{name}: {reason}"
        return None


def _ranks(cuts, max_tp: int, tp: int, ep: int | None = None) -> list[dict]:
    """Each rank's bytes (split, replicated) and chunk count, as a load of the published model moves them (with
    ``ep``: of each expert-parallel rank, its routed experts whole and no others)."""
    cache: dict[tuple, tuple[int, int]] = {}
    rows = [{"split_bytes": 0, "replicated_bytes": 0, "reads": 0} for _ in range(ep or tp)]
    names = [c.entry.name for c in cuts]
    for r, row in enumerate(rows):
        experts = linear(names, ep, r) if ep else None
        for c in cuts:
            whole = None if experts is None else pull_whole(c.entry.name, c.entry.shape, experts)
            if whole is False:
                continue
            key = (c.rule, c.entry.shape, c.entry.dtype, *((1, 0) if whole else (tp, r % tp)))
            if key not in cache:
                size = dtypes.itemsize(c.entry.dtype)
                kept = grid.rank_chunks(c.rule, c.entry.shape, max_tp, *key[3:])
                cache[key] = (
                    sum(grid.chunk_nbytes(c.entry.shape, c.rule.dim, k.start, k.end, size) for k in kept), len(kept)
                )
            nbytes, count = cache[key]
            row["replicated_bytes" if c.rule.dim is None else "split_bytes"] += nbytes
            row["reads"] += count
    return [
        {"rank": r, "bytes": row["split_bytes"] + row["replicated_bytes"],
         "bytes_read": row["split_bytes"] + row["replicated_bytes"], **row, "digest": None}
        for r, row in enumerate(rows)
    ]


# ------------------------------------------------------------------------------------------ helpers
def _load(config: str | Path | Mapping[str, Any]) -> tuple[dict, str]:
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = Path(config)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} is not a JSON object (expected a Hugging Face config.json)")
    return data, f"config {path}"


def _dtype_name(config: Mapping[str, Any]) -> str:
    """The checkpoint dtype: ``dtype`` (transformers 5) or ``torch_dtype``; float32 when the config names none."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if not isinstance(name, str) or not dtypes.known(name.removeprefix("torch.")):
        raise ConfigError(f"config: dtype {name!r} is not a dtype raydist-loader stores (e.g. bfloat16, float16)")
    return name.removeprefix("torch.")


def _quantization(config: Mapping[str, Any]) -> str | None:
    quant = config.get("quantization_config")
    if not quant:
        return None
    block = quant.get("weight_block_size")
    return f"{quant.get('quant_method')} blocks {block}" if block else str(quant.get("quant_method"))


def _notes(config: Mapping[str, Any]) -> list[str]:
    mtp = config.get("num_nextn_predict_layers")
    if mtp:
        return [f"the checkpoint's {mtp} multi-token-prediction layer(s) are not counted (engines load them only "
                "for speculative decoding)"]
    return []


def _model_name(config: Mapping[str, Any]) -> str:
    arch = config.get("architectures") or [config.get("model_type", "model")]
    return str(arch[0])


def _row(entry: Entry, rule, chunks: int) -> dict:
    return {
        "name": entry.name,
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "style": rule.style if rule else "-",
        "dim": rule.dim if rule else None,
        "chunks": chunks,
        "bytes": entry.nbytes,
    }
