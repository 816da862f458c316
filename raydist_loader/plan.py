"""PURE: (manifest, tp, rank) -> the reads this rank makes and where each lands, plus its expected digest.

No Ray, no network. A rank's shard of a split tensor is its chunks concatenated on the split dim in segment order;
a replicated tensor is its one chunk. On the chunked layout a rank reads exactly its chunks' bytes; in place, a
chunk on a later dim is a set of strided row pieces that are coalesced into one span when the gaps are small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Literal

from . import digest, dtypes, grid
from .manifest import ChunkRecord, Manifest, TensorRecord
from .rules import TensorRule

Layout = Literal["rank", "global"]
"""Where a rank's bytes land: ``rank``, the shard contract's rank-shaped tensors; ``global``, full-size tensors
(``global_shape``) of which the rank fills only its own region, as engines whose weight loaders narrow a full
tensor by the TP rank (vLLM, SGLang) want them: no copy between the read and the engine, and on CPU the pages
outside the region are never touched, so never committed (on a GPU the whole full-size arena would be allocated:
engines land host tensors and let their weight loaders copy each region to the device)."""


@dataclass(frozen=True)
class Piece:
    """``nbytes`` of object ``key`` at ``offset``."""

    key: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Extract:
    """The chunk is ``rows`` blocks of ``length`` bytes, ``stride`` apart, ``skip`` bytes into the span read."""

    rows: int
    stride: int
    skip: int
    length: int


@dataclass(frozen=True)
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

    @property
    def read_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
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
        return sum(sum(p.nbytes for p in pieces) for pieces in dict.fromkeys(r.pieces for r in self.reads))


def make_plan(
    manifest: Manifest,
    tp: int,
    rank: int,
    *,
    coalesce_gap: int = 1 << 20,
    only: Callable[[str], bool] | None = None,
    layout: Layout = "rank",
) -> RankPlan:
    """The plan of rank ``rank`` of ``tp``; refuses a tp the store does not serve, listing those it does.

    ``only(name)`` keeps a subset of the tensors (a pipeline stage's layers); the expected digest covers exactly
    the reads planned. ``layout`` says where the bytes land (see :data:`Layout`); the reads are the same."""
    manifest.check_tp(tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside tp={tp} (ranks 0..{tp - 1})")
    if layout not in ("rank", "global"):
        raise ValueError(f"layout must be 'rank' or 'global', got {layout!r}")
    slots, reads = [], []
    for name, rec in manifest.tensors.items():
        if only is not None and not only(name):
            continue
        slot, tensor_reads = _plan_tensor(manifest, name, rec, tp, rank, len(slots), coalesce_gap, layout)
        slots.append(slot)
        reads.extend(tensor_reads)
    return RankPlan(
        manifest.model,
        manifest.version,
        tp,
        rank,
        tuple(slots),
        tuple(reads),
        digest.rank_digest(r.xxh3 for r in reads),
    )


def expected_digests(manifest: Manifest, tp: int) -> list[str]:
    """Every rank's expected digest, computed at the driver before a load starts."""
    return [make_plan(manifest, tp, r).expected_digest for r in range(tp)]


def _plan_tensor(
    manifest, name, rec: TensorRecord, tp, rank, index, gap, layout: Layout = "rank"
) -> tuple[TensorSlot, list[ChunkRead]]:
    rule = rec.tensor_rule()
    shape = tuple(rec.shape)
    kept = grid.rank_chunks(rule, shape, manifest.max_tp, tp, rank)
    by_id = {c.id: c for c in rec.chunks}
    dim = rule.dim
    local = sum(c.end - c.start for c in kept) if dim is not None else None
    full = layout == "global" or dim is None
    rank_shape = shape if full else tuple(local if d == dim else s for d, s in enumerate(shape))
    slot = TensorSlot(
        name,
        rec.dtype,
        rank_shape,
        shape,
        dim,
        rule.style,
        _segment_spans(kept),
        grid.kv_replicas(rule, manifest.max_tp, tp),
        grid.padded_vocab(shape[dim]) if rule.style == "vocab" else None,
    )
    reads, pos = [], 0
    direct = dim is None or prod(rank_shape[:dim]) == 1
    for c, run in zip(kept, _runs(kept), strict=True):
        dest = c.start if layout == "global" and dim is not None else pos  # global: the chunk's own place
        reads.append(_chunk_read(rec, rule, by_id[c.id], index, dest, direct, gap, run))
        pos += c.end - c.start
    return slot, reads


def _runs(kept: list[grid.Chunk]) -> list[tuple[int, int]]:
    """For each kept chunk, the [lo, hi) of the run of back-to-back kept chunks it belongs to."""
    runs: list[list[grid.Chunk]] = []
    for c in kept:
        if runs and runs[-1][-1].end == c.start:
            runs[-1].append(c)
        else:
            runs.append([c])
    return [(run[0].start, run[-1].end) for run in runs for _ in run]


def _segment_spans(kept: list[grid.Chunk]) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for c in kept:
        a, b = spans.get(c.seg, (c.start, c.end))
        spans[c.seg] = (min(a, c.start), max(b, c.end))
    return spans


def _chunk_read(rec: TensorRecord, rule: TensorRule, c: ChunkRecord, index, dest, direct, gap, run) -> ChunkRead:
    if not c.nbytes:  # a zero-size tensor (any dim 0): nothing to read, nothing to place; its digest is of b""
        return ChunkRead(index, c.id, 0, c.xxh3, (), None, dest, True, c.blake3)
    pieces, extract = _source_pieces(rec, rule, c, gap, run)
    return ChunkRead(index, c.id, c.nbytes, c.xxh3, pieces, extract, dest, direct, c.blake3)


def _source_pieces(rec: TensorRecord, rule: TensorRule, c: ChunkRecord, gap: int, run: tuple[int, int]):
    """Where the chunk's bytes are: its parts (chunked layout), or ranges of the original tensor (in place).

    In place, a chunk on a later dim is ``outer`` strided rows. When the gaps between the rows of the rank's run
    of chunks are small, every chunk of the run names the SAME span (first row's start to last row's end) with
    its own cut, so the worker reads the span once and cuts each chunk out of it."""
    if rec.source is None:
        return tuple(Piece(p.object, p.offset, p.nbytes) for p in c.parts), None
    key, base = rec.source.object, rec.source.offset
    if rule.dim is None:
        return (Piece(key, base, c.nbytes),), None
    outer, inner = grid.strides(tuple(rec.shape), rule.dim, dtypes.itemsize(rec.dtype))
    stride, skip, length = rec.shape[rule.dim] * inner, c.start * inner, (c.end - c.start) * inner
    if outer == 1 or length == stride:
        return (Piece(key, base + skip, c.nbytes),), None
    lo, hi = run[0] * inner, run[1] * inner
    if stride - (hi - lo) <= gap:  # one span for the run, from its first row's start to its last row's end
        span = (outer - 1) * stride + (hi - lo)
        return (Piece(key, base + lo, span),), Extract(outer, stride, skip - lo, length)
    return tuple(Piece(key, base + o * stride + skip, length) for o in range(outer)), None
