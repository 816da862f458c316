"""Layer 2 (store): The store's manifest (format ``raydist-loader/2``): what a model is, how it is cut, where each chunk
lives.

A manifest is JSON at ``<model>/<version>/manifest.json`` (one per version, never changed; ``<model>/manifest.json``
is the pointer that names the current one, :mod:`.versions`); every object it names lives under
``<model>/<version>/`` (chunked layout) or is an original checkpoint file (in-place layout). It is validated on read:
a garbled manifest is an error naming the field, and one whose chunks disagree with its shapes and dtypes is refused
before any byte is read.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .. import dtypes
from ..bulk import bulk
from ..errors import ConfigError, ManifestError, NotFoundError, ShardingError
from ..options import MAX_TP, VERSION_PATTERN
from . import grid
from .rules import TensorRule

FORMAT = "raydist-loader/2"
#: formats an older raydist-loader wrote, and how to move on from them
_OLD_FORMATS = {"raydist-loader/1": "it was written by an older raydist-loader"}
_MAX_TP = MAX_TP
VERSION_RE = re.compile(VERSION_PATTERN)  # vYYYYmmddHHMMSSmmm-<8 hex>: sorts by time
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")
_HEX = {32: re.compile(r"(?:[0-9a-f]{32},)*"), 64: re.compile(r"(?:[0-9a-f]{64},)*")}
#: no byte size, offset or span of a manifest reaches this (a signed 64-bit offset: what files, S3 and torch use)
MAX_OFFSET = 1 << 63
_MAX_DIMS = 64  # dimensions of one tensor (torch allows 64 too)
MAX_CHAIN = 64  # versions one version may be built on (publishers write a full chunk again well before)


@dataclass(frozen=True)
class ManifestLimits:
    """How big a manifest a reader accepts, checked before anything is allocated or listed: its own size (before
    it is parsed), its tensors, its stored pieces (chunks, and parts of chunks stored one per key) and its files.
    The defaults hold every real checkpoint with room to spare (MoE repos have 20k-150k tensors; a manifest costs
    about 100-500 bytes per tensor, and 1e5 tensors parse in about a second); a rarer giant raises them through
    the environment of every process that reads the manifest (the driver, and the engine's workers)."""

    max_bytes: int = 128 << 20  # parsing holds about 20x this
    max_tensors: int = 500_000
    max_chunks: int = 4_000_000
    max_files: int = 10_000

    #: field -> the environment variable that overrides it
    ENV: ClassVar[dict[str, str]] = {
        "max_bytes": "RAYDIST_MAX_MANIFEST_BYTES",
        "max_tensors": "RAYDIST_MAX_TENSORS",
        "max_chunks": "RAYDIST_MAX_CHUNKS",
        "max_files": "RAYDIST_MAX_FILES",
    }

    @classmethod
    def from_env(cls) -> ManifestLimits:
        """The defaults, each overridden by its environment variable when set (a positive integer)."""
        values = {}
        for name, var in cls.ENV.items():
            text = os.environ.get(var)
            if text is None:
                continue
            try:
                values[name] = int(text.replace("_", ""))
            except ValueError:
                values[name] = 0
            if values[name] < 1:
                raise ConfigError(f"environment variable {var}={text!r}: expected a positive integer")
        return cls(**values)

    def refuse(self, where: str, what: str, count: int, field: str, limit: str | None = None) -> ManifestError:
        """The error for ``count`` ``what`` over the limit ``field`` (``limit`` says it when it is not the field's
        value alone)."""
        return ManifestError(
            f"{where}: {count} {what} is over the limit of {limit or getattr(self, field)}: a store that is damaged or "
            f"hostile, or a giant model: if it really is one, raise the limit with {self.ENV[field]}=N in the "
            "environment of every process that reads it"
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Part(NamedTuple):
    """``nbytes`` bytes of ``object`` at ``offset``; a chunk's parts concatenate to its bytes."""

    object: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as the manifest describes it (derived on demand from the compact record and the grid)."""

    id: str
    seg: str
    start: int
    end: int
    nbytes: int
    xxh3: str
    blake3: str | None
    parts: tuple[Part, ...]  # chunked layout; empty in place (the bytes are ranges of the tensor's source)


class TensorRecord(_Strict):
    """One tensor, compactly: its chunks are those of the grid of (rule, shape, max_tp), in grid order, so only
    their digests and where their bytes are need recording.

    ``at`` (chunked layout, chunks packed into objects): ``[object, offset]`` per chunk, flattened, ``object``
    an index into :attr:`Manifest.objects`; without ``at`` each chunk is its own object
    ``<model>/<version>/<tensor>::<chunk id>`` (``#0``, ``#1``... parts of ``key_part_bytes`` when larger).
    ``source`` (in place): ``[object, offset]`` where the tensor's row-major bytes start.

    A version built on others (:attr:`Manifest.chain`, RL updates, :mod:`.deltas`) may keep a chunk where an
    earlier version stored it: ``at`` then names that version's object, or (chunks stored one per object) ``home``
    gives the version per chunk (0: this one, k: ``chain[k - 1]``). ``delta`` lists per chunk the
    ``[object, offset, nbytes]`` triples (flattened, oldest first) of the compressed XOR deltas that turn those
    stored bytes into this version's chunk; an empty list: the stored bytes are the chunk.
    """

    dtype: str
    shape: list[int]
    rule: int = Field(ge=0)  # index into Manifest.tensor_rules
    xxh3: list[str]  # one per chunk, in grid order
    blake3: list[str] | None = None
    at: list[int] | None = None
    source: list[int] | None = None
    home: list[int] | None = None
    delta: list[list[int]] | None = None

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * dtypes.itemsize(self.dtype)


class FileRecord(_Strict):
    object: str
    nbytes: int = Field(ge=0)
    xxh3: str = Field(pattern=r"^[0-9a-f]{32}$")
    blake3: str | None = None


class Manifest(_Strict):
    """A model in a store. Every tensor refers to a shared table of cutting rules and objects, and its chunks are
    the grid's (:func:`raydist_loader.store.grid.chunks`), so the manifest grows by little more than a digest per chunk.
    Parsed and checked once (:meth:`from_json`); the per-tensor grid work is cached per distinct (rule, shape)."""

    format: Literal["raydist-loader/2"]
    model: str
    version: str
    layout: Literal["chunked", "inplace"]
    created: float  # when this version was published (written just before the swap that made it current)
    max_tp: int = Field(ge=1)
    digests: list[str] = Field(default_factory=lambda: ["xxh3_128"])
    rules: dict
    rules_fingerprint: str
    config: dict
    tensor_rules: list[dict]  # distinct TensorRule dicts; a tensor's ``rule`` indexes this
    objects: list[str] = Field(default_factory=list)  # packed chunk objects (chunked) or checkpoint files (in place)
    key_part_bytes: int | None = Field(default=None, ge=1)  # chunks stored one per object: largest part
    tensors: dict[str, TensorRecord]
    files: dict[str, FileRecord] = Field(default_factory=dict)
    #: stores of the layout before versions: earlier versions -> when each stopped being current (the current
    #: pointer, :mod:`.versions`, holds this now)
    retired: dict[str, float] | None = None
    #: earlier versions whose objects this one names (a version built on them from deltas, :mod:`.deltas`)
    chain: list[str] | None = None

    _rules: list[TensorRule] = PrivateAttr(default_factory=list)
    _grids: dict = PrivateAttr(default_factory=dict)

    # ---------------------------------------------------------------- (de)serialise
    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    @bulk
    def from_json(
        cls, data: bytes | str, *, where: str = "manifest", limits: ManifestLimits | None = None
    ) -> Manifest:
        """Parse and validate; any problem is a ManifestError naming the field or the limit. ``limits`` (default:
        :meth:`ManifestLimits.from_env`) are checked before parsing where they can be: the manifest's size, and a
        lower bound of its records (every tensor and file record has exactly one ``"xxh3"`` key)."""
        limits = limits or ManifestLimits.from_env()
        if len(data) > limits.max_bytes:
            raise limits.refuse(where, "bytes of manifest", len(data), "max_bytes")
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(
                    f"{where} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}): it is not a "
                    "manifest; re-publish or re-index the model"
                ) from None
            records = data.count(b'"xxh3"')
        else:
            records = data.count('"xxh3"')
        if records > limits.max_tensors + limits.max_files:  # more records than both limits allow together
            together = f"{limits.max_tensors} tensors + {limits.max_files} files"
            raise limits.refuse(where, "tensor and file records or more", records, "max_tensors", together)
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as e:
            raise _explain(e, data, where) from None
        manifest.check(where, limits)
        return manifest

    # ---------------------------------------------------------------- access
    def rule(self, name: str) -> TensorRule:
        """The cutting rule of tensor ``name``."""
        return self.rule_of(self.tensors[name])

    def rule_of(self, t: TensorRecord) -> TensorRule:
        if not self._rules:
            self._parse_rules("manifest")
        return self._rules[t.rule]

    def grid_of(self, t: TensorRecord) -> tuple[grid.Chunk, ...]:
        """The tensor's chunks at this store's max_tp (the grid; cached per rule and shape)."""
        return grid.chunks(self.rule_of(t), tuple(t.shape), self.max_tp)

    def parts(self, name: str, t: TensorRecord, index: int, chunk: grid.Chunk, nbytes: int) -> tuple[Part, ...]:
        """Where chunk ``index`` (``chunk``, of ``nbytes``) of tensor ``name`` is stored; empty in place."""
        if t.at is not None:
            return (Part(self.objects[t.at[2 * index]], t.at[2 * index + 1], nbytes),)
        if t.source is not None:
            return ()
        key = f"{self.model}/{self.home_version(t, index)}/{name}::{chunk.id}"
        size = self.key_part_bytes or nbytes
        if nbytes <= size:
            return (Part(key, 0, nbytes),)
        return tuple(Part(f"{key}#{k}", 0, min(size, nbytes - a)) for k, a in enumerate(range(0, nbytes, size)))

    def home_version(self, t: TensorRecord, index: int) -> str:
        """The version whose objects hold chunk ``index``'s stored bytes (chunks stored one per object)."""
        home = t.home[index] if t.home else 0
        return self.version if home == 0 else self.chain[home - 1]  # type: ignore[index]

    def deltas(self, t: TensorRecord, index: int) -> tuple[Part, ...]:
        """The compressed deltas chunk ``index`` applies to its stored bytes, oldest first (none: it is stored)."""
        steps = t.delta[index] if t.delta else ()
        return tuple(Part(self.objects[steps[k]], steps[k + 1], steps[k + 2]) for k in range(0, len(steps), 3))

    def chunks(self, name: str) -> list[ChunkRecord]:
        """Every chunk of tensor ``name`` with its digests and parts (tools and tests; plans use the grid)."""
        t = self.tensors[name]
        rule, shape, size = self.rule_of(t), tuple(t.shape), dtypes.itemsize(t.dtype)
        out = []
        for i, c in enumerate(self.grid_of(t)):
            nbytes = grid.chunk_nbytes(shape, rule.dim, c.start, c.end, size)
            b3 = t.blake3[i] if t.blake3 else None
            parts = self.parts(name, t, i, c, nbytes)
            out.append(ChunkRecord(c.id, c.seg, c.start, c.end, nbytes, t.xxh3[i], b3, parts))
        return out

    def source_of(self, t: TensorRecord) -> tuple[str, int] | None:
        """In place: (object, offset) of the tensor's row-major bytes."""
        return None if t.source is None else (self.objects[t.source[0]], t.source[1])

    # ---------------------------------------------------------------- consistency
    def check(self, where: str = "manifest", limits: ManifestLimits | None = None) -> None:
        """Cross-field checks: dtypes known, rules fit the shapes, one digest (and one place) per chunk of each
        tensor's grid, and every object named lies inside this model's version (a manifest can never make a
        reader touch another model's keys or a path outside the store). Grid work is done once per distinct
        (rule, shape), object names once each, digests in one pass: ~20k tensors check in well under a second."""
        limits = limits or ManifestLimits.from_env()
        if len(self.tensors) > limits.max_tensors:
            raise limits.refuse(where, "tensors", len(self.tensors), "max_tensors")
        if len(self.files) > limits.max_files:
            raise limits.refuse(where, "files", len(self.files), "max_files")
        if not VERSION_RE.match(self.version):
            raise ManifestError(f"{where}: field version: {self.version!r} is not a raydist-loader version id")
        self._check_chain(where)
        if self.max_tp > _MAX_TP:
            raise ManifestError(f"{where}: field max_tp: {self.max_tp} is above {_MAX_TP}")
        bad = [v for v in self.retired or () if not VERSION_RE.match(v)]
        if bad:
            raise ManifestError(f"{where}: field retired: {bad[0]!r} is not a raydist-loader version id")
        self._parse_rules(where)
        own = self.layout == "chunked"
        for i, key in enumerate(self.objects):
            self._check_object(key, f"{where}: objects[{i}]", own_version=own)
        pieces = total = 0
        for name, t in self.tensors.items():
            n, nbytes = self._check_tensor(name, t, f"{where}: tensors[{name!r}]")
            pieces += n
            total += nbytes
            if pieces > limits.max_chunks:
                raise limits.refuse(where, "stored chunks (and parts) or more", pieces, "max_chunks")
        if total >= MAX_OFFSET:
            raise ManifestError(f"{where}: the tensors add up to {total} bytes, past 2^63: not a real model")
        for algo, width in (("xxh3", 32), ("blake3", 64)):
            digests = [d for t in self.tensors.values() for d in (getattr(t, algo) or ())]
            if not _HEX[width].fullmatch(",".join(digests) + ("," if digests else "")):
                bad = next(
                    (n, i) for n, t in self.tensors.items() for i, d in enumerate(getattr(t, algo) or ())
                    if not _HEX[width].fullmatch(d + ",")
                )
                raise ManifestError(f"{where}: tensors[{bad[0]!r}].{algo}[{bad[1]}]: not {width} hex digits")
        for name, f in self.files.items():
            if not is_safe_file_name(name):
                raise ManifestError(
                    f"{where}: files[{_short(name)}]: not a plain relative file name (no absolute path, '..', empty "
                    "part, backslash, NUL or control character; parts of at most 255 bytes)"
                )
            if f.nbytes >= MAX_OFFSET:
                raise ManifestError(f"{where}: files[{name!r}].nbytes: {f.nbytes} is past 2^63")
            self._check_object(f.object, f"{where}: files[{name!r}].object", own_version=own)
        clash = file_name_clash(self.files)
        if clash:
            raise ManifestError(f"{where}: files[{clash[1]!r}]: file name {clash[0]!r} is also a directory of it")

    def _parse_rules(self, where: str) -> None:
        rules = []
        for i, d in enumerate(self.tensor_rules):
            try:
                rules.append(TensorRule.from_dict(d))
            except (KeyError, TypeError, ValueError) as e:
                raise ManifestError(f"{where}: tensor_rules[{i}]: {e}") from None
        self._rules[:] = rules

    def _check_tensor(self, name: str, t: TensorRecord, at: str) -> tuple[int, int]:
        """Check one tensor; returns (objects its chunks are stored in, or its chunks in place or packed; bytes)."""
        if not dtypes.known(t.dtype):
            raise ManifestError(f"{at}.dtype: unknown dtype {t.dtype!r}")
        if t.rule >= len(self._rules):
            raise ManifestError(f"{at}.rule: {t.rule} is not an index of tensor_rules ({len(self._rules)} rules)")
        sizes = self._grid_sizes(t, at)
        n = len(sizes)
        if len(t.xxh3) != n:
            raise ManifestError(f"{at}.xxh3: {len(t.xxh3)} digests for a chunk grid of {n} chunks")
        if t.blake3 is not None and len(t.blake3) != n:
            raise ManifestError(f"{at}.blake3: {len(t.blake3)} digests for a chunk grid of {n} chunks")
        nbytes = sum(sizes)
        if self.layout == "inplace":
            if t.source is None or t.at is not None:
                raise ManifestError(f"{at}.source: an in-place manifest reads each tensor from its source")
            self._check_places(t.source, 1, at + ".source", nbytes)
        elif t.source is not None:
            raise ManifestError(f"{at}.source: a chunked manifest has no sources")
        deltas = self._check_deltas(t, sizes, at)
        if self.layout == "inplace" or t.at is not None:
            if t.home is not None:
                raise ManifestError(f"{at}.home: only chunks stored one per object have a home version")
            if t.at is not None:
                self._check_places(t.at, n, at + ".at", max(sizes, default=0))
        elif self.key_part_bytes is None:
            raise ManifestError(f"{at}.at: missing (a manifest without key_part_bytes packs every chunk)")
        else:  # each chunk is the object <model>/<version>/<name>::<chunk id>: it must stay inside the version
            self._check_object(f"{self.model}/{self.version}/{name}::", at, own_version=True)
            if t.home is not None and (len(t.home) != n or min(t.home, default=0) < 0
                                       or max(t.home, default=0) > len(self.chain or ())):
                top = len(self.chain or ())
                raise ManifestError(f"{at}.home: {len(t.home)} entries for {n} chunk(s), each 0..{top} (0: this "
                                    "version, k: chain[k - 1])")
            return sum(-(-b // self.key_part_bytes) or 1 for b in sizes) + deltas, nbytes
        return n + deltas, nbytes

    def _check_chain(self, where: str) -> None:
        """The versions this one is built on: distinct version ids, each older than this one, at most MAX_CHAIN."""
        chain = self.chain or []
        if len(chain) > MAX_CHAIN:
            raise ManifestError(f"{where}: field chain: {len(chain)} versions (at most {MAX_CHAIN})")
        for v in chain:
            if not VERSION_RE.match(v) or v >= self.version:
                raise ManifestError(f"{where}: field chain: {v!r} is not a version id older than {self.version}")
        if len(set(chain)) != len(chain):
            raise ManifestError(f"{where}: field chain: a version is named twice")
        if chain and self.layout != "chunked":
            raise ManifestError(f"{where}: field chain: only a chunked version is built on others")

    def _check_deltas(self, t: TensorRecord, sizes: tuple[int, ...], at: str) -> int:
        """Per chunk, ``[object, offset, nbytes]`` triples whose bytes add up to at most the chunk's own (a reader
        never reads more than twice a chunk for it); returns how many deltas there are."""
        if t.delta is None:
            return 0
        if len(t.delta) != len(sizes) or self.layout != "chunked":
            raise ManifestError(f"{at}.delta: {len(t.delta)} entries for a chunk grid of {len(sizes)} chunks "
                                "(chunked layout only)")
        count = 0
        for i, (steps, size) in enumerate(zip(t.delta, sizes, strict=True)):
            if len(steps) % 3:
                raise ManifestError(f"{at}.delta[{i}]: {len(steps)} numbers, not [object, offset, nbytes] triples")
            for k in range(0, len(steps), 3):
                obj, offset, nbytes = steps[k : k + 3]
                why = (f"object index outside objects[0..{len(self.objects) - 1}]"
                       if not 0 <= obj < len(self.objects) else "negative offset" if offset < 0
                       else "empty delta" if nbytes < 1 else "past 2^63" if offset + nbytes >= MAX_OFFSET else None)
                if why:
                    raise ManifestError(f"{at}.delta[{i}] triple {k // 3} = {steps[k : k + 3]}: {why}")
            if sum(steps[2::3]) > size:
                raise ManifestError(f"{at}.delta[{i}]: {sum(steps[2::3])} bytes of deltas for a chunk of {size} bytes "
                                    "(a delta chain holds at most the chunk's own bytes)")
            count += len(steps) // 3
        return count

    def _grid_sizes(self, t: TensorRecord, at: str) -> tuple[int, ...]:
        """The bytes of each chunk of the tensor's grid; checks (once per rule, dtype and shape) that the shape is
        physical (its bytes below 2^63) and that the rule fits it."""
        key = (t.rule, t.dtype, tuple(t.shape))
        sizes = self._grids.get(key)
        if sizes is None:
            rule, shape = self._rules[t.rule], key[2]
            if len(shape) > _MAX_DIMS:
                raise ManifestError(f"{at}.shape: {len(shape)} dimensions (at most {_MAX_DIMS})")
            if any(s < 0 for s in shape):
                raise ManifestError(f"{at}.shape: negative size in {list(shape)}")
            itemsize = dtypes.itemsize(t.dtype)
            if prod(shape) * itemsize >= MAX_OFFSET:
                raise ManifestError(
                    f"{at}.shape: {_short(list(shape))} of {t.dtype} is 2^{(prod(shape) * itemsize).bit_length() - 1} "
                    "bytes or more, past 2^63: no store holds such a tensor"
                )
            if rule.dim is not None and not 0 <= rule.dim < len(shape):
                raise ManifestError(f"{at}.rule: split dim {rule.dim} is outside a tensor of shape {list(shape)}")
            if rule.style in ("colwise", "rowwise") and rule.extent != shape[rule.dim]:
                raise ManifestError(f"{at}.rule: segment sizes do not add up to dim {rule.dim} of shape {list(shape)}")
            if rule.style == "vocab" and len(rule.segments) != 1:
                raise ManifestError(f"{at}.rule: a vocab rule has one segment")
            sizes = self._grids[key] = tuple(
                grid.chunk_nbytes(shape, rule.dim, c.start, c.end, itemsize)
                for c in grid.chunks(rule, shape, self.max_tp)
            )
        return sizes

    def _check_places(self, places: list[int], n: int, at: str, span: int) -> None:
        """``[object, offset]`` pairs, flattened: ``n`` of them, objects in the table, offsets not negative, and a
        span of ``span`` bytes from every offset still below 2^63."""
        if len(places) != 2 * n:
            raise ManifestError(f"{at}: {len(places) // 2} [object, offset] pairs for {n} chunk(s)")
        objects, offsets = places[0::2], places[1::2]
        if n and (min(objects) < 0 or max(objects) >= len(self.objects) or min(offsets) < 0):
            raise ManifestError(
                f"{at}: an object index outside objects[0..{len(self.objects) - 1}] or a negative offset"
            )
        if n and max(offsets) + span >= MAX_OFFSET:
            raise ManifestError(f"{at}: offset {max(offsets)} with {span} bytes reaches past 2^63")

    def check_spans(self, sizes: Sequence[int | None], where: str = "manifest") -> None:
        """Every chunk (packed) or tensor (in place) lies inside its object, given the objects' sizes (``stat``,
        in the order of :attr:`objects`; None: missing). Before anything is allocated: a manifest can then never
        make a reader allocate more than the store holds. The error reads as a damaged store's (it may be one)."""
        for name, t in self.tensors.items():
            for i, steps in enumerate(t.delta or ()):
                for obj, offset, nbytes in zip(steps[0::3], steps[1::3], steps[2::3], strict=True):
                    if sizes[obj] is None or offset + nbytes > sizes[obj]:
                        raise NotFoundError(
                            f"delta {i} of tensor {name!r} in {where} needs bytes [{offset}, {offset + nbytes}) of "
                            f"{self.objects[obj]!r}, which " + ("does not exist" if sizes[obj] is None else
                                                              f"holds {sizes[obj]}") + ": the store is incomplete "
                            "(a version it is built on was deleted?): re-publish the model"
                        )
            places = t.at if t.at is not None else t.source
            if places is None:
                continue
            grid_sizes = self._grid_sizes(t, f"{where}: tensors[{name!r}]")
            spans = grid_sizes if t.at is not None else (sum(grid_sizes),)
            for i, nbytes in enumerate(spans):
                obj, offset = places[2 * i], places[2 * i + 1]
                size = sizes[obj]
                if size is None:
                    raise NotFoundError(
                        f"{self.objects[obj]!r} does not exist in {where} (tensor {name!r} is stored there): the "
                        "store is incomplete: re-publish the model"
                    )
                if offset + nbytes > size:
                    raise ManifestError(
                        f"truncated object {self.objects[obj]!r} in {where}: tensor {name!r} needs bytes "
                        f"[{offset}, {offset + nbytes}) of it and it holds {size}: the store is incomplete or was "
                        "modified (or its manifest does not describe it): re-publish the model"
                    )

    def _check_object(self, key: str, at: str, *, own_version: bool) -> None:
        """``key`` lies inside this model, and (``own_version``) inside this version or one of its chain."""
        prefixes = ([version_prefix(self.model, v) for v in (self.version, *(self.chain or ()))] if own_version
                    else [f"{self.model}/"])
        parts = key.split("/")
        if not key.startswith(tuple(prefixes)) or any(p in ("", ".", "..") for p in parts):
            shown = prefixes[0] + (" (or the versions of its chain)" if len(prefixes) > 1 else "")
            raise ManifestError(f"{at}: object {key!r} is outside {shown}")

    def renamed(self, model: str) -> Manifest:
        """This manifest as the one of ``model``: a model directory copied to another name with the backend's own
        tools (``cp -r``, ``aws s3 sync``, Redis ``COPY``) keeps its manifest, whose objects then resolve under the
        name that was asked for, never under the original's (chunks stored one per object are named after the
        model already)."""
        old = f"{self.model}/"
        data = self.model_dump(exclude_none=True)
        data["objects"] = [model + "/" + key[len(old) :] for key in data["objects"]]
        for record in data["files"].values():
            record["object"] = model + "/" + record["object"][len(old) :]
        manifest = Manifest.model_validate({**data, "model": model})
        manifest.check()
        return manifest

    def served_tps(self) -> list[int]:
        """Every tp this store can be loaded at."""
        return [tp for tp in range(1, self.max_tp + 1) if self._refusal(tp) is None]

    def check_tp(self, tp: int) -> None:
        """Refuse a tp the grid does not serve, listing the ones it does and how to re-publish."""
        why = self._refusal(tp)
        if why:
            raise ShardingError(
                f"model {self.model!r} cannot be loaded at tp={tp}: {why[0]}: {why[1]}. This store serves tp in "
                f"{self.served_tps()}; to serve other sizes re-publish with a different --max-tp"
            )

    def _refusal(self, tp: int) -> tuple[str, str] | None:
        """(first tensor, why) when ``tp`` cannot be served; one grid question per distinct (rule, shape)."""
        seen: set[tuple] = set()
        for name, t in self.tensors.items():
            key = (t.rule, tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            why = grid.refusal(self.rule_of(t), key[1], self.max_tp, tp)
            if why:
                return name, why
        return None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def all_objects(self) -> set[str]:
        """Every object this manifest reads (data and files)."""
        keys = {f.object for f in self.files.values()} | set(self.objects)
        for name, t in self.tensors.items():
            if t.at is None and t.source is None:
                keys.update(p.object for c in self.chunks(name) for p in c.parts)
        return keys


def _explain(e: ValidationError, data: bytes | str, where: str) -> ManifestError:
    """One clear error for a manifest that failed validation: not JSON, another format, or the bad field."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return ManifestError(f"{where} is not valid JSON ({err['msg']}); re-publish or re-index the model")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        return ManifestError(f"{where} is not valid JSON ({bad}); re-publish or re-index the model")
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt in _OLD_FORMATS:
        return ManifestError(
            f"{where}: format {fmt!r} is no longer read ({_OLD_FORMATS[fmt]}); this raydist-loader reads {FORMAT!r}: "
            "re-publish the model (`raydist-loader publish`) or re-index it (`raydist-loader index`)"
        )
    if fmt is not None and fmt != FORMAT:
        return ManifestError(
            f"{where}: format {fmt!r} is not supported; this raydist-loader reads {FORMAT!r} (a newer "
            "raydist-loader may have written it: upgrade)"
        )
    return ManifestError(f"{where}: field {_dotted(err['loc'])}: {err['msg']} (got {_short(err.get('input'))})")


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


#: longest file name component and whole relative name, in UTF-8 bytes (Linux NAME_MAX and PATH_MAX)
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096


def is_safe_file_name(name: str) -> bool:
    """A relative '/'-separated name with no empty, '.' or '..' part (it can only land inside a directory), no NUL
    or other control character, each part at most 255 bytes and the whole at most 4096 (what a file system takes)."""
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith(("/", "~"))
        and "\\" not in name
        and not any(ord(c) < 32 or c == "\x7f" for c in name)
        and len(name.encode("utf-8", "surrogatepass")) <= MAX_PATH_BYTES
        and all(p not in ("", ".", "..") and len(p.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
                for p in parts)
    )


def file_name_clash(names) -> tuple[str, str] | None:
    """(a name, a name below it) when one file name is a directory of another (``config.json`` and
    ``config.json/x``): both cannot be written."""
    names = set(names)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                return "/".join(parts[:i]), name
    return None


def version_prefix(model: str, version: str) -> str:
    return f"{model}/{version}/"


def check_stored(connector, manifest: Manifest) -> None:
    """Every span the manifest names lies inside its object as stored now (one ``stat`` per object of the table:
    packed files or checkpoint files; chunks stored one per key are read at their exact length). Loads call this
    before they allocate: a manifest that claims more bytes than its objects hold is refused, never allocated."""
    if manifest.objects:
        manifest.check_spans(connector.stat_many(manifest.objects), connector.describe())


def missing_message(connector, model: str) -> str:
    """Why ``model`` has no manifest in the store, and the command that gives it one."""
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
