"""Layer 0 (base): dtype names: torch <-> safetensors codes <-> item sizes. The manifest stores torch names
("bfloat16")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ManifestError

if TYPE_CHECKING:
    import torch

# torch name -> (safetensors code, item size); torch itself is imported only when a tensor is made
_TABLE: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
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
    import torch

    _entry(name)
    return getattr(torch, name)


def itemsize(name: str) -> int:
    return _entry(name)[1]


def known(name: str) -> bool:
    return name in _TABLE


def _entry(name: str) -> tuple[str, int]:
    try:
        return _TABLE[name]
    except KeyError:
        raise ManifestError(f"unknown dtype {name!r}; known: {sorted(_TABLE)}") from None
