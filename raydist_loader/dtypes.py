"""dtype names: torch <-> safetensors codes <-> item sizes. The manifest stores torch names ("bfloat16")."""

from __future__ import annotations

import torch

from .errors import ManifestError

# torch name -> (safetensors code, torch dtype)
_TABLE: dict[str, tuple[str, torch.dtype]] = {
    "float64": ("F64", torch.float64),
    "float32": ("F32", torch.float32),
    "float16": ("F16", torch.float16),
    "bfloat16": ("BF16", torch.bfloat16),
    "int64": ("I64", torch.int64),
    "int32": ("I32", torch.int32),
    "int16": ("I16", torch.int16),
    "int8": ("I8", torch.int8),
    "uint8": ("U8", torch.uint8),
    "bool": ("BOOL", torch.bool),
    "float8_e4m3fn": ("F8_E4M3", torch.float8_e4m3fn),
    "float8_e5m2": ("F8_E5M2", torch.float8_e5m2),
}
_BY_CODE = {code: name for name, (code, _) in _TABLE.items()}


def from_safetensors(code: str) -> str:
    """safetensors dtype code ("BF16") -> manifest name ("bfloat16")."""
    try:
        return _BY_CODE[code]
    except KeyError:
        raise ManifestError(f"unsupported safetensors dtype {code!r}; supported: {sorted(_BY_CODE)}") from None


def to_safetensors(name: str) -> str:
    return _entry(name)[0]


def torch_dtype(name: str) -> torch.dtype:
    return _entry(name)[1]


def itemsize(name: str) -> int:
    return _entry(name)[1].itemsize


def known(name: str) -> bool:
    return name in _TABLE


def _entry(name: str) -> tuple[str, torch.dtype]:
    try:
        return _TABLE[name]
    except KeyError:
        raise ManifestError(f"unknown dtype {name!r}; known: {sorted(_TABLE)}") from None
