"""Layer 2 (store): The chunk grid: how each tensor is cut at publish time, and which chunks each rank of a tp keeps.

Pure arithmetic over a :class:`~raydist_loader.store.rules.TensorRule` and a shape; publish, index, plan and inspect all
derive their cuts from here, so every rank's bytes follow one rule (see DESIGN.md, "The chunk grid"). A model has
few distinct (rule, shape) pairs however many tensors it has (an MoE's ~20k tensors have about ten), so the grid
functions are cached on them and return tuples.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import gcd, prod

from ..errors import ShardingError
from .rules import Segment, TensorRule

VOCAB_PAD = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: rows/cols ``[start, end)`` of the split dim, inside segment ``seg``."""

    seg: str
    index: int
    start: int
    end: int

    @property
    def id(self) -> str:
        return f"{self.seg}.{self.index}"


def padded_vocab(vocab: int) -> int:
    return -(-vocab // VOCAB_PAD) * VOCAB_PAD


def _segment_offsets(rule: TensorRule) -> list[tuple[Segment, int]]:
    out, offset = [], 0
    for seg in rule.segments:
        out.append((seg, offset))
        offset += seg.size
    return out


def _per_head_kv(seg: Segment, max_tp: int) -> bool:
    return seg.heads == "kv" and seg.size // seg.unit <= max_tp


def _segment_chunks(seg: Segment, offset: int, max_tp: int) -> list[Chunk]:
    units = seg.size // seg.unit
    count = units if _per_head_kv(seg, max_tp) else gcd(max_tp, units)
    step = units // count * seg.unit
    return [Chunk(seg.name, i, offset + i * step, offset + (i + 1) * step) for i in range(count)]


def _in_blocks(rule: TensorRule, cut: list[Chunk]) -> list[Chunk]:
    """A block scale's chunks: its weight's chunks (on whole blocks) divided by the block; the last one rounds up,
    as the scale of a weight whose size is not a whole number of blocks does."""
    size = rule.block_scale
    if size == 1:
        return cut
    return [Chunk(c.seg, c.index, c.start // size, -(-c.end // size)) for c in cut]


@lru_cache(maxsize=4096)
def chunks(rule: TensorRule, shape: tuple[int, ...], max_tp: int) -> tuple[Chunk, ...]:
    """Every chunk of a tensor at publish granularity ``max_tp``, in segment order."""
    if rule.style == "replicate":
        return (Chunk("all", 0, 0, shape[0] if shape else 1),)
    if rule.style == "vocab":
        vocab = shape[rule.dim]
        per = padded_vocab(vocab) // max_tp
        spans = [(min(vocab, i * per), min(vocab, (i + 1) * per)) for i in range(max_tp)]
        return tuple(Chunk("all", i, a, b) for i, (a, b) in enumerate(spans) if b > a)
    cut = [c for seg, off in _segment_offsets(rule) for c in _segment_chunks(seg, off, max_tp)]
    return tuple(_in_blocks(rule, cut))


@lru_cache(maxsize=4096)
def refusal(rule: TensorRule, shape: tuple[int, ...], max_tp: int, tp: int) -> str | None:
    """Why this tensor cannot be served at ``tp`` (None when it can)."""
    if tp < 1 or max_tp % tp:
        return f"tp={tp} does not divide the published max_tp={max_tp}"
    if rule.style == "replicate":
        return None
    if rule.style == "vocab":
        padded = padded_vocab(shape[rule.dim])
        return None if padded % tp == 0 else f"padded vocab {padded} is not divisible by tp={tp}"
    for seg in rule.segments:
        units = seg.size // seg.unit
        what = {"q": "q heads", "kv": "kv heads", "none": f"dim {rule.dim} units"}[seg.heads]
        replicated_head = seg.heads == "kv" and _per_head_kv(seg, max_tp) and tp > units
        if seg.heads == "kv" and _per_head_kv(seg, max_tp):
            ok = units % tp == 0 if tp <= units else tp % units == 0
        else:
            ok = gcd(max_tp, units) % tp == 0
        if not ok:
            return f"segment {seg.name!r} has {units} {what}, which cannot be split across tp={tp}"
        rows = seg.unit if replicated_head else seg.size // tp
        if tp > 1 and rows % seg.block:
            return (
                f"segment {seg.name!r} would be cut into {rows} rows of dim {rule.dim} per rank at tp={tp}, "
                f"which splits its {seg.block}-row quantization blocks"
            )
    return None


@lru_cache(maxsize=16384)
def rank_chunks(rule: TensorRule, shape: tuple[int, ...], max_tp: int, tp: int, rank: int) -> tuple[Chunk, ...]:
    """The chunks rank ``rank`` of ``tp`` keeps, in the order they are concatenated on the split dim."""
    if rule.style == "replicate":
        return chunks(rule, shape, max_tp)
    if rule.style == "vocab":
        vocab = shape[rule.dim]
        per = padded_vocab(vocab) // tp
        lo, hi = min(vocab, rank * per), min(vocab, (rank + 1) * per)
        return tuple(c for c in chunks(rule, shape, max_tp) if lo <= c.start and c.end <= hi)
    out: list[Chunk] = []
    for seg, off in _segment_offsets(rule):
        seg_chunks = _segment_chunks(seg, off, max_tp)
        units = len(seg_chunks)
        if seg.heads == "kv" and _per_head_kv(seg, max_tp) and tp > units:
            out.append(seg_chunks[rank // (tp // units)])
        else:
            per = units // tp
            out.extend(seg_chunks[rank * per : (rank + 1) * per])
    return tuple(_in_blocks(rule, out))


def kv_replicas(rule: TensorRule, max_tp: int, tp: int) -> int:
    """How many ranks hold each kv head at ``tp`` (1 unless tp > kv heads)."""
    for seg in rule.segments:
        if seg.heads == "kv" and tp > seg.size // seg.unit:
            return tp // (seg.size // seg.unit)
    return 1


def chunk_shape(shape: tuple[int, ...], dim: int | None, chunk: Chunk) -> tuple[int, ...]:
    """Shape of one chunk (a replicated tensor's only chunk is the whole tensor)."""
    if dim is None:
        return tuple(shape)
    return tuple(chunk.end - chunk.start if d == dim else s for d, s in enumerate(shape))


def chunk_nbytes(shape: tuple[int, ...], dim: int | None, start: int, end: int, itemsize: int) -> int:
    """Bytes of the chunk ``[start, end)`` on ``dim`` (the whole tensor when replicated)."""
    if dim is None:
        return prod(shape) * itemsize
    return prod(shape[:dim]) * (end - start) * prod(shape[dim + 1 :]) * itemsize


def strides(shape: tuple[int, ...], dim: int, itemsize: int) -> tuple[int, int]:
    """(outer, inner_bytes) of ``shape`` around ``dim``: the tensor is ``outer`` rows of ``shape[dim] * inner``."""
    return prod(shape[:dim]), prod(shape[dim + 1 :]) * itemsize


@lru_cache(maxsize=4096)
def lowest_slot(rule: TensorRule, shape: tuple[int, ...], max_tp: int) -> dict[str, int]:
    """chunk id -> the lowest rank at ``max_tp`` that keeps it (the file a chunk is packed into; shared: read
    it, never change it)."""
    owner: dict[str, int] = {}
    for rank in range(max_tp):
        for c in rank_chunks(rule, shape, max_tp, max_tp, rank):
            owner.setdefault(c.id, rank)
    return owner


def check_max_tp(rules: dict[str, TensorRule], shapes: dict[str, tuple[int, ...]], max_tp: int) -> None:
    """Refuse a ``max_tp`` that some tensor cannot be cut into, naming the tensor and a max_tp that works."""
    if max_tp < 1:
        raise ShardingError(f"max_tp must be >= 1, got {max_tp}")
    bad = {n: why for n, r in rules.items() if (why := refusal(r, shapes[n], max_tp, max_tp))}
    if bad:
        kinds = {(r, shapes[n]) for n, r in rules.items()}  # one check per distinct cut, not per tensor
        ok = [t for t in range(max_tp, 0, -1) if all(not refusal(r, shape, t, t) for r, shape in kinds)]
        # a block scale is refused with its weight, for the same reason: name the weights
        shown = [(n, why) for n, why in bad.items() if rules[n].block_scale == 1] or list(bad.items())
        listing = "; ".join(f"{n}: {why}" for n, why in shown[:5])
        raise ShardingError(
            f"cannot publish with max_tp={max_tp}: {listing}"
            + (f" (+{len(shown) - 5} more)" if len(shown) > 5 else "")
            + f"; the largest max_tp this model can be cut into is {ok[0]}: pass --max-tp {ok[0]}"
            + f" (max_tp values up to {max_tp} that work: {sorted(ok)})"
        )


def chunk_bytes(raw, shape: tuple[int, ...], dim: int | None, itemsize: int, chunk: Chunk):
    """The row-major bytes of ``chunk`` cut from a tensor's flat uint8 array ``raw`` (numpy), contiguous.

    A dim-0 (or leading-dims-1) chunk is a zero-copy slice; a chunk on a later dim is gathered into a new array.
    """
    if dim is None:
        return raw
    outer, inner = strides(shape, dim, itemsize)
    rows = raw.reshape(outer, shape[dim] * inner)[:, chunk.start * inner : chunk.end * inner]
    return rows.reshape(-1) if outer == 1 else rows.copy().reshape(-1)
