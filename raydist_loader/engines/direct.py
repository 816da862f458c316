"""Layer 5 (engines): Where an engine's weight loaders put each checkpoint tensor, learnt exactly, engine-neutral.

vLLM's and SGLang's models take weights through ``model.load_weights(iterable of (name, full tensor))``, whose
per-parameter weight loaders narrow the full tensor by the TP rank and copy it into (a region of) a parameter. To
read a rank's chunks straight into those parameters, :func:`capture` runs ``load_weights`` once over *probe*
tensors (meta tensors of the checkpoint's global shape and dtype: no byte exists, none is read) under a
``TorchFunctionMode`` that records every ``copy_`` (and ``__setitem__``) whose source comes from a probe: the
destination view (a real parameter region, not written) and the source view's storage offset and strides in the
global tensor. A tensor goes **direct** only when the capture proves it a plain copy:

- every copy's source is a view of the probe (narrowing, slicing, indexing: no cast, no ``contiguous()`` copy, no
  arithmetic), of the probe's dtype and the destination's shape and dtype, laid out as a box of the global tensor
  (not transposed or merged);
- each of the rank's chunks lies inside exactly one copied box and meets no other; each copied box is covered by
  the rank's chunks (a loader reading bytes outside the rank's region would read what the store did not send);
- the destination is a region of the model's own parameters or buffers (not a loader's temporary, nor the new
  tensor advanced indexing makes: ``param[rows] = w``);
- the destination is on the host (GPU parameters stream through ``load_weights``: not direct yet), its region of
  each chunk is contiguous or a [rows, columns] block, and nothing else the loaders do writes over it (an
  in-place op on any real tensor is recorded with its byte span; one overlapping a direct copy's destination,
  other than by the same tensor's loader before its copy, makes that tensor fall back).

Everything else (casts, transposes, quantized repacking, ``.item()``, a loader that raises on a meta tensor, a
tensor no loader copies) falls back: it is streamed through ``load_weights`` as a full-size tensor, as before. A
loader that raises marks the tensor it was loading as fallback and the probe run restarts without it. Side effects
of the probe run on real tensors that do not involve a probe (vLLM's zero fill of vocab padding) happen for real,
as they would in the real load. Not detected: a loader that *reads* a parameter after copying into it.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import prod
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from .. import dtypes
from ..store.plan import ChunkRead, RankPlan

_RESTARTS = 32  # probe runs restarted after a loader raised (each drops one tensor to the fallback), and at most
# about 4 passes over the tensors in all
Box = tuple[tuple[int, int], ...]  # [start, end) per dim of the global tensor


@dataclass
class Capture:
    """Where each tensor of a rank's plan goes: ``targets`` (for :meth:`~raydist_loader.load.stream.ShardStream.land`)
    for the tensors at plan indices ``direct`` (named in ``direct_names``); ``fallback`` maps every other tensor's
    name to why it goes through ``load_weights``; ``loaded`` is what the probe run's ``load_weights`` returned (the
    parameters of every tensor it processed; None when the model reports nothing)."""

    targets: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    direct: list[int] = field(default_factory=list)
    direct_names: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    loaded: set[str] | None = None
    seconds: float = 0.0


class _Copy(NamedTuple):
    seq: int
    name: str
    box: Box
    dims: tuple[int | None, ...]  # for each dim of the copied view: the global dim it runs along (None: size 1)
    dest: torch.Tensor
    span: tuple[int, int]  # bytes of the destination's memory it may touch [lo, hi)


def capture(model: torch.nn.Module, plan: RankPlan) -> Capture:
    """Run ``model.load_weights`` over probes of ``plan``'s tensors and work out which chunks can be read straight
    into the model's parameters (see the module's docstring)."""
    t0 = time.perf_counter()
    names = [s.name for s in plan.tensors]
    slots = {s.name: s for s in plan.tensors}
    bad: dict[str, str] = {}
    saved = {n: (p, p.data) for n, p in model.named_parameters()}
    recorder, loaded, fed = None, None, 0
    for _ in range(_RESTARTS):
        if fed > 4 * len(names):  # restarts cost a pass each: past a few passes, stop learning
            return _all_fallback(plan, f"load_weights raised on {len(bad)} probes", t0)
        recorder = _Recorder()
        try:
            with recorder:
                loaded = model.load_weights(recorder.feed([(n, slots[n]) for n in names if n not in bad]))
            break
        except Exception as e:  # noqa: BLE001 - the tensor being loaded falls back; its real load will tell
            fed += len(recorder.probes)
            if recorder.current is None:
                return _all_fallback(plan, f"load_weights raised before the first tensor: {e}", t0)
            bad[recorder.current] = f"load_weights raised {type(e).__name__} on a probe: {str(e)[:200]}"
    else:
        return _all_fallback(plan, f"load_weights raised on {_RESTARTS} probes", t0)
    changed = [n for n, (p, data) in saved.items() if p.device != data.device or p.data_ptr() != data.data_ptr()]
    if changed:  # a loader replaced a parameter's data (with a probe): put it back, and trust nothing
        for n in changed:
            saved[n][0].data = saved[n][1]
        return _all_fallback(plan, f"load_weights replaced parameter data ({changed[0]}, ...)", t0)
    bad.update(recorder.bad)
    out = Capture(loaded=set(loaded) if loaded is not None else None)
    copies: dict[str, list[_Copy]] = {}
    for c in recorder.copies:
        copies.setdefault(c.name, []).append(c)
    clobbered = _clobbered(recorder)
    owned = _memory_of(model)
    reads: dict[int, list[ChunkRead]] = {}
    for r in plan.reads:
        reads.setdefault(r.tensor, []).append(r)
    for index, slot in enumerate(plan.tensors):
        why = bad.get(slot.name) or _why_not(slot.name, copies.get(slot.name), clobbered, owned)
        targets = None if why else _targets(slot, copies[slot.name], reads.get(index, []))
        if isinstance(targets, str) or why:
            out.fallback[slot.name] = why or targets
            continue
        out.direct.append(index)
        out.direct_names.append(slot.name)
        out.targets.update({(index, chunk): t for chunk, t in targets.items()})
    out.seconds = time.perf_counter() - t0
    return out


def _all_fallback(plan: RankPlan, why: str, t0: float) -> Capture:
    return Capture(fallback={s.name: why for s in plan.tensors}, seconds=time.perf_counter() - t0)


def _why_not(
    name: str, copies: list[_Copy] | None, clobbered: set[int], owned: list[tuple[int, int]]
) -> str | None:
    if not copies:
        return "load_weights copied nothing of it (skipped, or not a plain copy)"
    if not all(_inside(c.span, owned) for c in copies):
        return "a weight loader copies it into a tensor that is not the model's (a temporary, copied on later)"
    if any(c.seq in clobbered for c in copies):
        return "another write of the weight loaders overlaps its destination"
    if any(c.dest.device.type != "cpu" for c in copies):
        return f"its parameter is on {copies[0].dest.device} (only host parameters are read into directly)"
    return None


def _memory_of(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The memory [lo, hi) of every parameter and buffer of ``model`` (their whole storages), sorted: the only
    places a chunk may be read into."""
    spans = set()
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        spans.add((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return sorted(spans)


def _inside(span: tuple[int, int], owned: list[tuple[int, int]]) -> bool:
    """Whether ``span`` lies inside one of the ``owned`` spans (sorted by start; distinct storages never overlap,
    so only the last one starting at or before ``span`` can hold it)."""
    i = bisect.bisect_right(owned, (span[0], float("inf"))) - 1
    return i >= 0 and span[1] <= owned[i][1]


def _clobbered(recorder: _Recorder) -> set[int]:
    """The copies (by seq) whose destination another write overlaps (a later write of the same tensor's loader,
    another tensor's write or copy at any time): reading into them ahead would not give the loaders' result."""
    writes = [(c.seq, c.name, c.span) for c in recorder.copies] + recorder.writes
    out = set()
    for c in recorder.copies:
        lo, hi = c.span
        for seq, name, (a, b) in writes:
            if seq == c.seq or b <= lo or a >= hi:
                continue
            if name == c.name and seq < c.seq:  # the same loader prepared the region before copying into it
                continue
            out.add(c.seq)
    return out


def _targets(slot, copies: list[_Copy], reads: list[ChunkRead]) -> dict[str, torch.Tensor] | str:
    """chunk id -> the uint8 place of its bytes, or why the tensor cannot go direct."""
    shape, dim = slot.global_shape, slot.dim
    if not reads or any(not r.nbytes for r in reads):
        return "no bytes to read (zero-size)"
    boxes = {r.chunk: _chunk_box(slot, r) for r in reads}
    for c in copies:  # every copied box is made of the rank's chunks
        if sum(_volume(_meet(c.box, b)) for b in boxes.values()) != _volume(c.box):
            return "a weight loader copies bytes outside the rank's region"
    out = {}
    for r in reads:
        box = boxes[r.chunk]
        meeting = [c for c in copies if _volume(_meet(c.box, box))]
        if len(meeting) != 1 or _meet(meeting[0].box, box) != box:
            return f"chunk {r.chunk} is not copied into exactly one place"
        c = meeting[0]
        region = c.dest
        for k, j in enumerate(c.dims):
            if j is not None:
                region = region.narrow(k, box[j][0] - c.box[j][0], box[j][1] - box[j][0])
        try:
            if region.is_contiguous():
                target = region.reshape(-1).view(torch.uint8)
            elif r.direct and r.extract is None:
                return f"chunk {r.chunk} is contiguous in the checkpoint but not in the parameter"
            else:  # a column block: [rows, columns] as the transfers count rows
                target = region.view(prod(shape[:dim]), -1).view(torch.uint8)
        except RuntimeError:
            return f"the parameter region of chunk {r.chunk} is neither contiguous nor a block of rows"
        if target.numel() != r.nbytes:
            return f"chunk {r.chunk} has {r.nbytes} bytes, its place {target.numel()}"
        out[r.chunk] = target
    return out


def _chunk_box(slot, read: ChunkRead) -> Box:
    """The chunk's region of the global tensor: all of it but ``[dest, dest + length)`` on the split dim."""
    shape, dim = slot.global_shape, slot.dim
    if dim is None:
        return tuple((0, n) for n in shape)
    across = prod(shape) // shape[dim] * dtypes.itemsize(slot.dtype)
    length = read.nbytes // across
    return tuple((read.dest, read.dest + length) if d == dim else (0, n) for d, n in enumerate(shape))


def _meet(a: Box, b: Box) -> Box:
    return tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))


def _volume(box: Box) -> int:
    return prod(max(0, b - a) for a, b in box)


def _box(view: torch.Tensor, shape: tuple[int, ...]) -> tuple[Box, tuple[int | None, ...]] | None:
    """The view of a contiguous tensor of ``shape`` as a box of it (and which global dim each view dim runs
    along), or None when it is not one (transposed, merged or overlapping dims)."""
    strides = [prod(shape[j + 1 :]) for j in range(len(shape))]
    offset, start = view.storage_offset(), []
    for stride in strides:
        start.append(offset // stride)
        offset %= stride
    length, dims, last = [1] * len(shape), [], -1
    for size, stride in zip(view.shape, view.stride(), strict=True):
        if size == 1:
            dims.append(None)
            continue
        j = next((j for j in range(last + 1, len(shape)) if strides[j] == stride and shape[j] > 1), None)
        if j is None:
            return None
        dims.append(j)
        length[j], last = size, j
    if any(s + n > full for s, n, full in zip(start, length, shape, strict=True)):
        return None
    return tuple((s, s + n) for s, n in zip(start, length, strict=True)), tuple(dims)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of memory a (strided) tensor may touch."""
    if not t.numel():
        return (0, 0)
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Recorder(TorchFunctionMode):
    """Records, during a probe run, the copies out of probes and every in-place write to a real tensor."""

    def __init__(self):
        super().__init__()
        self.probes: dict[int, tuple[str, torch.Tensor]] = {}  # id(probe) -> (name, probe)
        self.current: str | None = None
        self.copies: list[_Copy] = []
        self.writes: list[tuple[int, str | None, tuple[int, int]]] = []
        self.bad: dict[str, str] = {}
        self._seq = 0

    def feed(self, items) -> Iterator[tuple[str, torch.Tensor]]:
        """The probes, one per (name, slot), as ``load_weights`` takes them; ``current`` names the one in use."""
        for name, slot in items:
            probe = torch.empty(slot.global_shape, dtype=dtypes.torch_dtype(slot.dtype), device="meta")
            self.probes[id(probe)] = (name, probe)
            self.current = name
            yield name, probe

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "copy_" and len(args) >= 2 and _meta(args[1]) and not _meta(args[0]):
            self._copy(args[0], args[1])
            return args[0]
        if name == "__setitem__" and len(args) == 3 and _meta(args[2]) and not _meta(args[0]):
            dest = args[0][args[1]]
            if not _aliases(dest, args[0]):  # advanced indexing: a new tensor, not a region of args[0]
                owner = self._owner(args[2]) or self.current or ""
                self.bad.setdefault(owner, "a weight loader writes it through advanced indexing (not a view)")
                return None
            self._copy(dest, args[2])
            return None
        result = func(*args, **kwargs)
        inplace = (name.endswith("_") and not name.startswith("_")) or name == "__setitem__"
        target = kwargs.get("out") if "out" in kwargs else (args[0] if inplace and args else None)
        if isinstance(target, torch.Tensor):
            self._seq += 1
            if _meta(target):  # the checkpoint tensor itself changed before its copy: not a plain copy
                owner = self._owner(target)
                if owner:
                    self.bad.setdefault(owner, f"{name} changes the checkpoint tensor in place")
            else:
                self.writes.append((self._seq, self.current, _span(target)))
        return result

    def _owner(self, t: torch.Tensor) -> str | None:
        for candidate in (t, t._base):
            hit = self.probes.get(id(candidate)) if candidate is not None else None
            if hit is not None and hit[1] is candidate:
                return hit[0]
        return None

    def _copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        self._seq += 1
        name = self._owner(src)
        if name is None:
            self.bad.setdefault(self.current or "", "a weight loader copies a tensor computed from it (not a view)")
            return
        probe = self.probes[id(src if src._base is None else src._base)][1]
        if src.dtype != probe.dtype or dest.dtype != src.dtype:
            self.bad.setdefault(name, f"a weight loader casts it ({probe.dtype} -> {dest.dtype})")
            return
        if tuple(dest.shape) != tuple(src.shape):
            self.bad.setdefault(name, f"a weight loader copies {tuple(src.shape)} into {tuple(dest.shape)}")
            return
        found = _box(src, tuple(probe.shape))
        if found is None:
            self.bad.setdefault(name, "a weight loader copies a transposed or reshaped view of it")
            return
        box, dims = found
        self.copies.append(_Copy(self._seq, name, box, dims, dest.detach(), _span(dest)))


def _aliases(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` is a view of ``base``'s memory (basic indexing), not a new tensor (advanced indexing)."""
    return view._is_view() and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta
