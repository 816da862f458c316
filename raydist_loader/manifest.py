"""The store's manifest (format ``raydist-loader/1``): what a model is, how it is cut, where each chunk lives.

A manifest is JSON at ``<model>/manifest.json``; every object it names lives under ``<model>/<version>/`` (chunked
layout) or is an original checkpoint file (in-place layout). It is validated on read: a garbled manifest is an error
naming the field, and one whose chunks disagree with its shapes and dtypes is refused before any byte is read.
"""

from __future__ import annotations

import json
import re
import time
from math import prod
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import dtypes, grid
from .errors import ManifestError, NotFoundError, ShardingError
from .rules import TensorRule

FORMAT = "raydist-loader/1"
_MAX_TP = 1024
VERSION_RE = re.compile(r"^v\d{17}-[0-9a-f]{8}$")  # vYYYYmmddHHMMSSmmm-<8 hex>: sorts by time
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Part(_Strict):
    """``nbytes`` bytes of ``object`` at ``offset``; a chunk's parts concatenate to its bytes."""

    object: str
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class ChunkRecord(_Strict):
    id: str
    seg: str
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    xxh3: str = Field(pattern=r"^[0-9a-f]{32}$")
    blake3: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    parts: list[Part] = Field(default_factory=list)  # chunked layout; empty for in-place (derived from source)


class Source(_Strict):
    """In-place layout: the whole tensor's row-major bytes start at ``offset`` of ``object``."""

    object: str
    offset: int = Field(ge=0)


class TensorRecord(_Strict):
    dtype: str
    shape: list[int]
    rule: dict
    chunks: list[ChunkRecord]
    source: Source | None = None

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * dtypes.itemsize(self.dtype)

    def tensor_rule(self) -> TensorRule:
        return TensorRule.from_dict(self.rule)


class FileRecord(_Strict):
    object: str
    nbytes: int = Field(ge=0)
    xxh3: str = Field(pattern=r"^[0-9a-f]{32}$")
    blake3: str | None = None


class Manifest(_Strict):
    format: Literal["raydist-loader/1"]
    model: str
    version: str
    layout: Literal["chunked", "inplace"]
    created: float  # when this manifest became current (written just before the swap)
    max_tp: int = Field(ge=1)
    digests: list[str] = Field(default_factory=lambda: ["xxh3_128"])
    rules: dict
    rules_fingerprint: str
    config: dict
    tensors: dict[str, TensorRecord]
    files: dict[str, FileRecord] = Field(default_factory=dict)
    #: earlier versions -> when each stopped being current (the swap that replaced it); ``gc`` counts from it
    retired: dict[str, float] | None = None

    # ---------------------------------------------------------------- (de)serialise
    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":"), sort_keys=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = "manifest") -> Manifest:
        """Parse and validate; any problem is a ManifestError naming the field."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where} is not valid JSON ({e}); re-publish or re-index the model") from None
        if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT):
            raise ManifestError(
                f"{where}: format {raw.get('format')!r} is not supported; this raydist-loader reads {FORMAT!r}"
            )
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            path = _dotted(err["loc"])
            raise ManifestError(f"{where}: field {path}: {err['msg']} (got {_short(err.get('input'))})") from None
        manifest.check(where)
        return manifest

    # ---------------------------------------------------------------- consistency
    def check(self, where: str = "manifest") -> None:
        """Cross-field checks: dtypes known, rules fit the shapes, chunks cover each tensor exactly, nbytes agree
        with shape x dtype, and every object named lies inside this model's version (a manifest can never make a
        reader touch another model's keys or a path outside the store)."""
        if not VERSION_RE.match(self.version):
            raise ManifestError(f"{where}: field version: {self.version!r} is not a raydist-loader version id")
        if self.max_tp > _MAX_TP:
            raise ManifestError(f"{where}: field max_tp: {self.max_tp} is above {_MAX_TP}")
        bad = [v for v in self.retired or () if not VERSION_RE.match(v)]
        if bad:
            raise ManifestError(f"{where}: field retired: {bad[0]!r} is not a raydist-loader version id")
        for name, t in self.tensors.items():
            self._check_tensor(name, t, f"{where}: tensors[{name!r}]")
        for name, f in self.files.items():
            if not is_safe_file_name(name):
                raise ManifestError(f"{where}: files[{name!r}]: not a plain relative file name")
            self._check_object(f.object, f"{where}: files[{name!r}].object", own_version=self.layout == "chunked")

    def _check_tensor(self, name: str, t: TensorRecord, at: str) -> None:
        if not dtypes.known(t.dtype):
            raise ManifestError(f"{at}.dtype: unknown dtype {t.dtype!r}")
        if any(s < 0 for s in t.shape):
            raise ManifestError(f"{at}.shape: negative size in {t.shape}")
        try:
            rule = t.tensor_rule()
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{at}.rule: {e}") from None
        if rule.dim is not None and not 0 <= rule.dim < len(t.shape):
            raise ManifestError(f"{at}.rule.dim: {rule.dim} is outside a tensor of shape {t.shape}")
        if rule.style in ("colwise", "rowwise") and rule.extent != t.shape[rule.dim]:
            raise ManifestError(f"{at}.rule.segments: sizes do not add up to dim {rule.dim} of shape {t.shape}")
        expected = grid.chunks(rule, tuple(t.shape), self.max_tp)
        got = [(c.id, c.start, c.end) for c in t.chunks]
        if got != [(c.id, c.start, c.end) for c in expected]:
            raise ManifestError(f"{at}.chunks: chunk grid {got[:4]}... does not match its rule and shape")
        if (t.source is None) != (self.layout == "chunked"):
            raise ManifestError(
                f"{at}.source: a {self.layout} manifest {'needs' if t.source is None else 'has no'} sources"
            )
        if t.source is not None:
            self._check_object(t.source.object, f"{at}.source.object", own_version=False)
        for i, c in enumerate(t.chunks):
            want = grid.chunk_nbytes(tuple(t.shape), rule.dim, c.start, c.end, dtypes.itemsize(t.dtype))
            if c.nbytes != want:
                raise ManifestError(
                    f"{at}.chunks[{i}].nbytes: {c.nbytes} disagrees with shape {t.shape} and dtype "
                    f"{t.dtype} (expected {want})"
                )
            if self.layout == "chunked" and sum(p.nbytes for p in c.parts) != c.nbytes:
                raise ManifestError(f"{at}.chunks[{i}].parts: parts add up to a size other than nbytes")
            if self.layout == "inplace" and c.parts:
                raise ManifestError(f"{at}.chunks[{i}].parts: an in-place manifest reads from sources, not parts")
            for p in c.parts:
                self._check_object(p.object, f"{at}.chunks[{i}].parts", own_version=True)

    def _check_object(self, key: str, at: str, *, own_version: bool) -> None:
        prefix = version_prefix(self.model, self.version) if own_version else f"{self.model}/"
        parts = key.split("/")
        if not key.startswith(prefix) or any(p in ("", ".", "..") for p in parts):
            raise ManifestError(f"{at}: object {key!r} is outside {prefix}")

    def renamed(self, model: str) -> Manifest:
        """This manifest as the one of ``model``: a model directory copied to another name with the backend's own
        tools (``cp -r``, ``aws s3 sync``, Redis ``COPY``) keeps its manifest, whose objects then resolve under the
        name that was asked for, never under the original's."""
        old = f"{self.model}/"
        data = self.model_dump(exclude_none=True)
        objects = list(data["files"].values())
        for t in data["tensors"].values():
            objects += [t["source"]] if "source" in t else [p for c in t["chunks"] for p in c["parts"]]
        for record in objects:
            record["object"] = model + "/" + record["object"][len(old) :]
        manifest = Manifest.model_validate({**data, "model": model})
        manifest.check()
        return manifest

    def served_tps(self) -> list[int]:
        """Every tp this store can be loaded at."""
        return [
            tp
            for tp in range(1, self.max_tp + 1)
            if all(
                grid.refusal(t.tensor_rule(), tuple(t.shape), self.max_tp, tp) is None for t in self.tensors.values()
            )
        ]

    def check_tp(self, tp: int) -> None:
        """Refuse a tp the grid does not serve, listing the ones it does and how to re-publish."""
        for name, t in self.tensors.items():
            why = grid.refusal(t.tensor_rule(), tuple(t.shape), self.max_tp, tp)
            if why:
                raise ShardingError(
                    f"model {self.model!r} cannot be loaded at tp={tp}: {name}: {why}. This store serves tp in "
                    f"{self.served_tps()}; to serve other sizes re-publish with a different --max-tp"
                )

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def objects(self) -> set[str]:
        """Every object this manifest reads (data and files)."""
        keys = {f.object for f in self.files.values()}
        for t in self.tensors.values():
            if t.source:
                keys.add(t.source.object)
            keys.update(p.object for c in t.chunks for p in c.parts)
        return keys


# --------------------------------------------------------------------- store layout (names)
def check_model_name(model: str) -> str:
    if not _MODEL_RE.match(model or "") or ".." in model:
        raise ManifestError(
            f"invalid model name {model!r}: use letters, digits, '.', '_', '-' and '/' between parts "
            "(e.g. 'llama-3-8b' or 'meta-llama/Llama-3-8B')"
        )
    return model


def manifest_key(model: str) -> str:
    return f"{check_model_name(model)}/manifest.json"


def new_version(seed: str) -> str:
    """A fresh version id ``vYYYYmmddHHMMSSmmm-<8 hex>`` (UTC, milliseconds): ids sort in publish order."""
    import hashlib

    now = time.time_ns()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now / 1e9)) + f"{now // 1_000_000 % 1000:03d}"
    return f"v{stamp}-{hashlib.sha256(f'{seed}{now}'.encode()).hexdigest()[:8]}"


def is_safe_file_name(name: str) -> bool:
    """A relative '/'-separated name with no empty, '.' or '..' part (it can only land inside a directory)."""
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith(("/", "~"))
        and "\\" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


def version_prefix(model: str, version: str) -> str:
    return f"{model}/{version}/"


def read_manifest(connector, model: str) -> Manifest:
    """Read and validate ``<model>/manifest.json``; a missing one says how to publish or index."""
    return read_manifest_bytes(connector, model)[0]


def read_manifest_bytes(connector, model: str) -> tuple[Manifest, bytes]:
    """The validated manifest and the exact bytes it was parsed from (to pin with a sha256, or hand to actors).

    A manifest that names another model (the model was copied to this name) is re-rooted under ``model`` and
    its bytes re-serialised: the load, and a sha256 pinned for this name, cover the manifest as read here.
    """
    key = manifest_key(model)
    if connector.stat(key) is None:
        raise NotFoundError(_missing_message(connector, model))
    raw = connector.read(key)
    manifest = Manifest.from_json(raw, where=f"{connector.describe()} {key}")
    if manifest.model != model:
        manifest = manifest.renamed(model)
        raw = manifest.to_json()
    return manifest, raw


def _missing_message(connector, model: str) -> str:
    where = connector.describe()
    top_level = (k for k in _take(connector.list(f"{model}/"), 10000) if "/" not in k[len(model) + 1 :])
    has_checkpoint = any(k.endswith(".safetensors") for k in top_level)
    if has_checkpoint:
        return (
            f"{where} holds a safetensors checkpoint under {model}/ but no raydist-loader manifest: run "
            f"`raydist-loader index {where} --model {model}` once to record its digests"
        )
    return (
        f"model {model!r} not found in {where} (no {model}/manifest.json): publish it with "
        f"`raydist-loader publish CHECKPOINT_DIR {where} --model {model}`"
    )


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _dotted(loc: tuple) -> str:
    """pydantic's error location as ``tensors['x'].chunks[2].nbytes``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out.endswith(("tensors", "files")):
            out += f"[{part!r}]"
        else:
            out += f".{part}"
    return out.lstrip(".")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
