"""Layer 2 (store): PURE: (manifest, tp, rank) -> the reads this rank makes and where each lands, plus its expected
digest.

No Ray, no network. A rank's shard of a split tensor is its chunks concatenated on the split dim in segment order;
a replicated tensor is its one chunk. On the chunked layout a rank reads exactly its chunks' bytes; in place, a
chunk on a later dim is a set of strided row pieces that are coalesced into one span when the gaps are small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from math import prod
from typing import Literal, NamedTuple

from .. import digest, dtypes
from ..bulk import bulk
from . import grid
from .experts import Experts, pull_whole
from .manifest import Manifest, TensorRecord
from .rules import TensorRule

Layout = Literal["rank", "global"]
"""Where a rank's bytes land: ``rank``, the shard contract's rank-shaped tensors; ``global``, full-size tensors
(``global_shape``) of which the rank fills only its own region, as engines whose weight loaders narrow a full
tensor by the TP rank (vLLM, SGLang) want them: no copy between the read and the engine, and on CPU the pages
outside the region are never touched, so never committed (on a GPU the whole full-size arena would be allocated:
engines land host tensors and let their weight loaders copy each region to the device)."""


class Piece(NamedTuple):
    """``nbytes`` of object ``key`` at ``offset``."""

    key: str
    offset: int
    nbytes: int


class Extract(NamedTuple):
    """The chunk is ``rows`` blocks of ``length`` bytes, ``stride`` apart, ``skip`` bytes into the span read."""

    rows: int
    stride: int
    skip: int
    length: int


@dataclass(frozen=True, slots=True)
class ChunkRead:
    """One chunk: the pieces to read (back to back into one buffer), how to cut it out, where it lands."""

    tensor: int  # index into RankPlan.tensors
    chunk: str  # chunk id, e.g. "q.0"
    nbytes: int  # the chunk's own bytes
    xxh3: str
    pieces: tuple[Piece, ...]
    extract: Extract | None  # None: the pieces are exactly the chunk's bytes
    dest: int  # start on the rank tensor's split dim (0 for replicated)
    direct: bool  # the chunk is contiguous in the rank tensor: read straight into it
    blake3: str | None = None
    #: compressed deltas applied, oldest first, to the bytes ``pieces`` read (a version built on earlier ones,
    #: :mod:`.deltas`): such a chunk is rebuilt before it is hashed and placed
    deltas: tuple[Piece, ...] = ()

    @property
    def read_bytes(self) -> int:
        """Bytes of the chunk's stored span (its deltas not counted: :attr:`delta_bytes`)."""
        return sum(p.nbytes for p in self.pieces)

    @property
    def delta_bytes(self) -> int:
        return sum(p.nbytes for p in self.deltas)


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """A tensor as this rank holds it, with the metadata an engine needs to place it."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # this rank's shape (the global shape in the ``global`` layout)
    global_shape: tuple[int, ...]
    dim: int | None  # split dim, None when replicated
    style: str
    segments: dict[str, tuple[int, int]]  # segment -> [start, end) of the global split dim held by this rank
    kv_replicas: int = 1
    padded_vocab: int | None = None

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * dtypes.itemsize(self.dtype)

    def meta(self) -> dict:
        """The shard contract's per-tensor metadata (JSON-able)."""
        return {
            "global_shape": list(self.global_shape),
            "shape": list(self.shape),
            "dim": self.dim,
            "style": self.style,
            "segments": {k: list(v) for k, v in self.segments.items()},
            "kv_replicas": self.kv_replicas,
            "padded_vocab": self.padded_vocab,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class RankPlan:
    model: str
    version: str
    tp: int
    rank: int
    tensors: tuple[TensorSlot, ...]
    reads: tuple[ChunkRead, ...]
    expected_digest: str

    @property
    def bytes_kept(self) -> int:
        return sum(r.nbytes for r in self.reads)

    @property
    def bytes_read(self) -> int:
        """Bytes requested from the store; chunks that share one span (in place, strided) count it once."""
        return store_bytes(self.reads)

    @bulk
    def __reduce__(self):
        """Pickled as rows of plain values: Ray ships a plan of ~20k reads to its actor in a few tens of ms
        (cloudpickle takes ~0.5 s object by object)."""
        slots = tuple(tuple(getattr(s, f) for f in _SLOT_FIELDS) for s in self.tensors)
        reads = tuple(
            (r.tensor, r.chunk, r.nbytes, r.xxh3, tuple(map(tuple, r.pieces)), r.extract and tuple(r.extract),
             r.dest, r.direct, r.blake3, tuple(map(tuple, r.deltas)))
            for r in self.reads
        )
        head = (self.model, self.version, self.tp, self.rank)
        return _unpickle_plan, (head, slots, reads, self.expected_digest)



_SLOT_FIELDS = tuple(f.name for f in fields(TensorSlot))


def store_bytes(reads: Sequence[ChunkRead]) -> int:
    """Bytes requested from the store for ``reads``: a span several chunks share counts once, deltas each."""
    spans = sum(sum(p.nbytes for p in pieces) for pieces in dict.fromkeys(r.pieces for r in reads))
    return spans + sum(r.delta_bytes for r in reads)


@bulk
def _unpickle_plan(head: tuple, slots: tuple, reads: tuple, expected: str) -> RankPlan:
    return RankPlan(
        *head,
        tuple(TensorSlot(*s) for s in slots),
        tuple(
            ChunkRead(t, c, n, x, tuple(Piece(*p) for p in pieces), e and Extract(*e), d, direct, b3,
                      tuple(Piece(*p) for p in steps))
            for t, c, n, x, pieces, e, d, direct, b3, steps in reads
        ),
        expected,
    )


@bulk
def make_plan(
    manifest: Manifest,
    tp: int,
    rank: int,
    *,
    coalesce_gap: int = 1 << 20,
    only: Callable[[str], bool] | None = None,
    layout: Layout = "rank",
    experts: Experts | None = None,
) -> RankPlan:
    """The plan of rank ``rank`` of ``tp``; refuses a tp the store does not serve, listing those it does.

    ``only(name)`` keeps a subset of the tensors (a pipeline stage's layers); the expected digest covers exactly
    the reads planned. ``layout`` says where the bytes land (see :data:`Layout`); the reads are the same.
    ``experts``: expert parallelism (see :mod:`~raydist_loader.store.experts`): the routed experts this rank
    holds are pulled whole (every chunk), the others not at all; every other tensor as at ``tp``."""
    if not 0 <= rank < tp:
        manifest.check_tp(tp)
        raise ValueError(f"rank {rank} is outside tp={tp} (ranks 0..{tp - 1})")
    return make_plans(
        manifest, tp, coalesce_gap=coalesce_gap, only=only, layout=layout, ranks=[rank], experts=experts
    )[0]


@bulk
def make_plans(
    manifest: Manifest,
    tp: int,
    *,
    coalesce_gap: int = 1 << 20,
    only: Callable[[str], bool] | None = None,
    layout: Layout = "rank",
    ranks: Sequence[int] | None = None,
    experts: Experts | None = None,
) -> list[RankPlan]:
    """Every rank's plan (or those of ``ranks``), made once: the driver hands each actor its own, so actors neither
    parse the manifest nor plan. Options as in :func:`make_plan` (``experts``: the same placement for every rank
    planned, so pass it with one rank)."""
    manifest.check_tp(tp)
    if layout not in ("rank", "global"):
        raise ValueError(f"layout must be 'rank' or 'global', got {layout!r}")
    planner = _Planner(manifest, tp, coalesce_gap, layout, experts)
    names = [n for n in manifest.tensors if only is None or only(n)]
    return [planner.plan(rank, names) for rank in (range(tp) if ranks is None else ranks)]


def expected_digests(manifest: Manifest, tp: int) -> list[str]:
    """Every rank's expected digest, computed at the driver before a load starts (digests only, no reads)."""
    manifest.check_tp(tp)
    planner = _Planner(manifest, tp, 1 << 20)
    return [
        digest.rank_digest(
            t.xxh3[k.index] for t in manifest.tensors.values() for k in planner.geometry(t, rank).kept
        )
        for rank in range(tp)
    ]


@dataclass(frozen=True, slots=True)
class _Kept:
    """One chunk a rank keeps: its index in the tensor's grid (and digest list), id, bytes and place."""

    index: int
    chunk: grid.Chunk
    nbytes: int
    dest: int  # start on the rank tensor's split dim (the global tensor's in the ``global`` layout)
    run: tuple[int, int]  # [lo, hi) of the run of back-to-back kept chunks it belongs to


@dataclass(frozen=True)
class _Geometry:
    """What a rank does with every tensor of one (rule, shape, dtype): the same for ~all experts of an MoE."""

    rule: TensorRule
    shape: tuple[int, ...]  # global
    rank_shape: tuple[int, ...]
    segments: dict[str, tuple[int, int]]
    kv_replicas: int
    padded_vocab: int | None
    direct: bool
    kept: tuple[_Kept, ...]


class _Planner:
    """Plans the ranks of one tp over one manifest; grid work is cached per (rule, shape, dtype, rank), so a rank
    of a 20k-tensor MoE costs one small record per chunk it keeps."""

    def __init__(
        self, manifest: Manifest, tp: int, gap: int, layout: Layout = "rank", experts: Experts | None = None
    ):
        self.m, self.tp, self.gap, self.layout, self.experts = manifest, tp, gap, layout, experts
        self._objects = manifest.objects
        self._geometries: dict[tuple, _Geometry] = {}
        self._cuts: dict[tuple, tuple[tuple[Piece, ...], Extract | None]] = {}

    def plan(self, rank: int, names: Sequence[str]) -> RankPlan:
        slots, reads = [], []
        for name in names:
            rec = self.m.tensors[name]
            whole = None if self.experts is None else pull_whole(name, rec.shape, self.experts)
            if whole is False:  # another rank's expert
                continue
            geo = self.geometry(rec, rank, whole=bool(whole))
            index = len(slots)
            slots.append(
                TensorSlot(
                    name, rec.dtype, geo.rank_shape, geo.shape, geo.rule.dim, geo.rule.style, geo.segments,
                    geo.kv_replicas, geo.padded_vocab,
                )
            )
            for k in geo.kept:
                reads.append(self._read(name, rec, geo, k, index))
        m = self.m
        return RankPlan(
            m.model, m.version, self.tp, rank, tuple(slots), tuple(reads), digest.rank_digest(r.xxh3 for r in reads)
        )

    def geometry(self, rec: TensorRecord, rank: int, *, whole: bool = False) -> _Geometry:
        """``whole``: every chunk (an expert this rank holds under expert parallelism), as rank 0 of tp=1."""
        tp, rank = (1, 0) if whole else (self.tp, rank)
        key = (rec.rule, tuple(rec.shape), rec.dtype, tp, rank)
        geo = self._geometries.get(key)
        if geo is None:
            geo = self._geometries[key] = self._make_geometry(rec, tp, rank)
        return geo

    def _make_geometry(self, rec: TensorRecord, tp: int, rank: int) -> _Geometry:
        rule, shape, max_tp = self.m.rule_of(rec), tuple(rec.shape), self.m.max_tp
        kept = grid.rank_chunks(rule, shape, max_tp, tp, rank)
        position = {c.id: i for i, c in enumerate(grid.chunks(rule, shape, max_tp))}
        dim, size = rule.dim, dtypes.itemsize(rec.dtype)
        local = sum(c.end - c.start for c in kept) if dim is not None else None
        full = self.layout == "global" or dim is None
        rank_shape = shape if full else tuple(local if d == dim else s for d, s in enumerate(shape))
        out, pos = [], 0
        for c, run in zip(kept, _runs(kept), strict=True):
            dest = c.start if self.layout == "global" and dim is not None else pos  # global: the chunk's own place
            out.append(_Kept(position[c.id], c, grid.chunk_nbytes(shape, dim, c.start, c.end, size), dest, run))
            pos += c.end - c.start
        return _Geometry(
            rule,
            shape,
            rank_shape,
            _segment_spans(kept),
            grid.kv_replicas(rule, max_tp, tp),
            grid.padded_vocab(shape[dim]) if rule.style == "vocab" else None,
            dim is None or prod(rank_shape[:dim]) == 1,
            tuple(out),
        )

    def _read(self, name: str, rec: TensorRecord, geo: _Geometry, k: _Kept, index: int) -> ChunkRead:
        b3 = rec.blake3[k.index] if rec.blake3 else None
        if not k.nbytes:  # a zero-size tensor (any dim 0): nothing to read, nothing to place; its digest is of b""
            return ChunkRead(index, k.chunk.id, 0, rec.xxh3[k.index], (), None, k.dest, True, b3)
        source = self.m.source_of(rec)
        if rec.at is not None:  # packed (the usual chunked layout): one piece
            pieces, extract = (Piece(self._objects[rec.at[2 * k.index]], rec.at[2 * k.index + 1], k.nbytes),), None
        elif source is None:  # a chunk in its own object(s)
            pieces = tuple(Piece(*p) for p in self.m.parts(name, rec, k.index, k.chunk, k.nbytes))
            extract = None
        else:
            pieces, extract = self._source_pieces(rec, geo, k, *source)
        deltas = tuple(Piece(*p) for p in self.m.deltas(rec, k.index)) if rec.delta else ()
        return ChunkRead(index, k.chunk.id, k.nbytes, rec.xxh3[k.index], pieces, extract, k.dest, geo.direct, b3,
                         deltas)

    def _source_pieces(self, rec: TensorRecord, geo: _Geometry, k: _Kept, key: str, base: int):
        """In place, the chunk's bytes are ranges of the original tensor. A chunk on a later dim is ``outer``
        strided rows; when the gaps between the rows of the rank's run of chunks are small, every chunk of the
        run names the SAME span (first row's start to last row's end) with its own cut, so the worker reads the
        span once and cuts each chunk out of it."""
        c, dim = k.chunk, geo.rule.dim
        if dim is None:
            return (Piece(key, base, k.nbytes),), None
        outer, inner = grid.strides(geo.shape, dim, dtypes.itemsize(rec.dtype))
        stride, skip, length = geo.shape[dim] * inner, c.start * inner, (c.end - c.start) * inner
        if outer == 1 or length == stride:
            return (Piece(key, base + skip, k.nbytes),), None
        lo, hi = k.run[0] * inner, k.run[1] * inner
        if stride - (hi - lo) <= self.gap:  # one span for the run, from its first row's start to its last row's end
            span = (outer - 1) * stride + (hi - lo)
            return (Piece(key, base + lo, span),), Extract(outer, stride, skip - lo, length)
        return tuple(Piece(key, base + o * stride + skip, length) for o in range(outer)), None


def _runs(kept: Sequence[grid.Chunk]) -> list[tuple[int, int]]:
    """For each kept chunk, the [lo, hi) of the run of back-to-back kept chunks it belongs to."""
    runs: list[list[grid.Chunk]] = []
    for c in kept:
        if runs and runs[-1][-1].end == c.start:
            runs[-1].append(c)
        else:
            runs.append([c])
    return [(run[0].start, run[-1].end) for run in runs for _ in run]


def _segment_spans(kept: Sequence[grid.Chunk]) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for c in kept:
        a, b = spans.get(c.seg, (c.start, c.end))
        spans[c.seg] = (min(a, c.start), max(b, c.end))
    return spans
