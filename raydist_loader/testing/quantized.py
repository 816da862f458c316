"""Aside (testing, imported by no product module): Tiny quantized checkpoints laid out as they ship, made by quantizing
a tiny model from :mod:`.tiny_models`.

Schemes (``scheme=``), each with the tensor names, dtypes, shapes and ``quantization_config`` its tools write:

* ``"fp8_block"``: FP8 block quantization as DeepSeek-V3 and Qwen3-FP8 ship it: every quantized linear weight
  ``float8_e4m3fn`` (``fmt="e5m2"``: ``float8_e5m2``) with a float32 ``weight_scale_inv`` of
  ``[ceil(out/B0), ceil(in/B1)]`` (weight = fp8 x scale, block by block); config
  ``{quant_method: fp8, fmt, activation_scheme: dynamic, weight_block_size: [B0, B1]}``.
* ``"ct_block"``: compressed-tensors' FP8 block scheme: the same cut, the scale named ``weight_scale``, the block
  in ``config_groups.group_0.weights.block_structure``.
* ``"ct_channel"``: compressed-tensors' FP8 per-channel scheme (llm-compressor ``FP8``): ``weight_scale``
  ``[out, 1]`` and a static per-tensor ``input_scale`` ``[1]``.

Which weights are quantized follows :func:`raydist_loader.store.sizing.fp8_quantized` (linear layers; not embeddings,
lm_head or routers). Tiny block sizes (e.g. 16) give tiny shapes several blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from ..store.sizing import fp8_quantized
from .tiny_models import make_tiny_checkpoint

Scheme = Literal["fp8_block", "ct_block", "ct_channel"]
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def make_tiny_quantized_checkpoint(
    model_type: str,
    dest: str | Path,
    *,
    scheme: Scheme = "fp8_block",
    block: tuple[int, int] = (16, 16),
    fmt: Literal["e4m3", "e5m2"] = "e4m3",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny ``model_type`` checkpoint quantized with ``scheme`` to ``dest`` (see the module docstring)."""
    path = make_tiny_checkpoint(model_type, dest, dtype=torch.bfloat16, seed=seed, **config_overrides)
    weights = path / "model.safetensors"
    state = load_file(weights)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not fp8_quantized(name, tuple(tensor.shape)):
            out[name] = tensor
        elif scheme == "ct_channel":
            out[name], out[f"{name}_scale"] = _per_channel(tensor, _FP8[fmt])
            out[f"{name.removesuffix('.weight')}.input_scale"] = torch.tensor([0.05], dtype=torch.float32)
        else:
            scale_name = f"{name}_scale_inv" if scheme == "fp8_block" else f"{name}_scale"
            out[name], out[scale_name] = _per_block(tensor, block, _FP8[fmt])
    save_file(out, weights, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = _quantization_config(scheme, block, fmt)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def _per_block(w: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per block): each block scaled so that its largest value is the format's max."""
    rows, cols = w.shape
    b0, b1 = block
    grid_rows, grid_cols = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(grid_rows * b0, grid_cols * b1)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(grid_rows, b0, grid_cols, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(dtype).max
    quantized = (blocks / scale[:, None, :, None]).view(grid_rows * b0, grid_cols * b1)[:rows, :cols]
    return quantized.to(dtype).contiguous(), scale.contiguous()


def _per_channel(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale [out, 1]): one scale per output channel."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(dtype).max
    return (w.float() / scale).to(dtype).contiguous(), scale.contiguous()


def _quantization_config(scheme: Scheme, block: tuple[int, int], fmt: str) -> dict[str, Any]:
    """config.json's ``quantization_config`` as the tool of each scheme writes it."""
    if scheme == "fp8_block":
        return {"quant_method": "fp8", "fmt": fmt, "activation_scheme": "dynamic", "weight_block_size": list(block)}
    weights: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    if scheme == "ct_block":
        weights |= {"strategy": "block", "block_structure": list(block)}
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "group",
                       "group_size": block[1]}
    else:
        weights |= {"strategy": "channel"}
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": ["lm_head"],
    }
