"""Layer 3 (load): Transfer machinery, shared part (below the worker: imports plan, chunks, connectors, retry;
never the worker): one rank's arena on the final device and the pieces both copy paths use.

The arena is one allocation per rank with a flat uint8 view per tensor (256-byte aligned): reads (CPU) or H2D
copies (GPU) land in place, and chunks of consecutive tensors are adjacent, so the GPU path moves them with one copy.
:class:`~raydist_loader.load.transfer_cpu.CpuTransfer` and :class:`~raydist_loader.load.transfer_gpu.GpuTransfer` fill
it; the worker (:class:`~raydist_loader.load.worker.ShardLoader`) picks one per device and hands in how to start a
chunk's digest, so the bytes are hashed as they land (overlapping further reads) while verification stays the worker's.

Staging memory does not grow with the largest tensor: a chunk or in-place span larger than
:data:`~raydist_loader.store.chunks.PART_BYTES` is read in parts of whole rows (several ranged reads of its object),
each part hashed (digests are streamed, so they are the whole chunk's) and placed before the next is read into the same
buffer (:func:`~raydist_loader.store.chunks.read_in_parts`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from math import prod
from typing import ClassVar

import numpy as np
import torch

from .. import dtypes
from ..connectors import Connector, ReadRequest
from ..digest import ChunkHash
from ..errors import ConfigError, ManifestError, ShardingError
from ..pool import run_all
from ..retry import RetryPolicy
from ..retry import call as with_retries
from ..store.chunks import (
    PART_BYTES,
    PlacePart,
    cut,
    in_parts,
    part_rows,
    read_in_parts,
    rebuild,
    requests_for,
    rows_of,
    stage_bytes,
)
from ..store.plan import ChunkRead, RankPlan, TensorSlot

_ALIGN = 256  # every tensor starts 256-byte aligned in the arena

#: (tensor index, chunk id) -> digest of the bytes that landed
Digests = dict[tuple[int, str], str]
StartHash = Callable[[ChunkRead], ChunkHash]  # a fresh digest for a chunk, fed its bytes in order


class Transfer:
    """One rank's arena and the copy path that fills it; subclasses implement :meth:`_pull` per device."""

    #: largest staging buffer (bytes); see :data:`PART_BYTES`
    part_bytes: ClassVar[int] = PART_BYTES

    def __init__(
        self,
        plan: RankPlan,
        device: torch.device,
        connector: Connector,
        retry_policy: RetryPolicy,
        rank: int,
        start_hash: StartHash,
    ):
        self.plan, self.device, self.connector, self.retry_policy, self.rank = (
            plan, device, connector, retry_policy, rank
        )
        self._start_hash = start_hash
        self._lock = threading.Lock()
        self._done = 0  # bytes landed (progress)
        self.tensors: dict[str, torch.Tensor] = {}
        self._allocate()

    @property
    def done(self) -> int:
        """Bytes landed so far."""
        return self._done

    def pull(self, reads: Sequence[ChunkRead], concurrency: int) -> Digests:
        """Read the chunks, hash each as it completes, place it; then view the arena as the rank's tensors."""
        empty = torch.empty(0, dtype=torch.uint8)  # zero-size tensors: no bytes to read or place
        digests = {(r.tensor, r.chunk): self._hash(empty, r) for r in reads if not r.nbytes}
        digests.update(self._pull([r for r in reads if r.nbytes and not r.deltas], concurrency))
        rebuilt = [r for r in reads if r.nbytes and r.deltas]
        built = run_all(self._rebuilt, rebuilt, concurrency, f"rank{self.rank}")
        digests.update(zip(((r.tensor, r.chunk) for r in rebuilt), built, strict=True))
        self._expose()
        return digests

    def _rebuilt(self, read: ChunkRead) -> str:
        """A chunk built from deltas (:func:`~raydist_loader.store.chunks.rebuild`) on the host, hashed, placed;
        a delta that does not decode is a chunk that fails verification (re-pulled once, then named)."""
        buf = torch.empty(read.nbytes, dtype=torch.uint8)
        try:
            rebuild(read, buf, lambda requests: self._read(self.connector, requests), self.connector.max_request_bytes)
        except ManifestError as e:
            return f"undecodable delta ({e})"
        self._place(read, buf)
        with self._lock:
            self._done += read.nbytes
        return self._hash(buf, read)

    def region(self, read: ChunkRead, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The chunk's place in ``tensors`` (default: where it landed); ``verify="full"`` re-hashes it there."""
        return self._region(read, tensors)

    def _pull(self, reads: Sequence[ChunkRead], concurrency: int) -> Digests:
        raise NotImplementedError

    def _hash(self, chunk: torch.Tensor, read: ChunkRead) -> str:
        """The digest of a whole chunk's bytes (a host tensor)."""
        h = self._start_hash(read)
        h.update(chunk.contiguous().cpu().numpy())
        return h.hexdigest()

    # ---------------------------------------------------------------- reading in parts (chunks.read_in_parts)
    def _in_parts(self, group: list[ChunkRead]) -> bool:
        return in_parts(group, self.part_bytes)

    def _rows(self, read: ChunkRead) -> tuple[int, int]:
        return rows_of(read, self.plan.tensors[read.tensor])

    def _parts(self, group: list[ChunkRead]) -> Iterator[tuple[int, int]]:
        """The group's parts, one at a time (never a list of them: a huge read has very many)."""
        return part_rows(group[0], self.plan.tensors[group[0].tensor], self.part_bytes)

    def _stage_size(self, group: list[ChunkRead], whole: int) -> int:
        return stage_bytes(group, self.plan.tensors[group[0].tensor], self.part_bytes, whole)

    def _stream(self, group: list[ChunkRead], buf: torch.Tensor, conn: Connector, place: PlacePart) -> list[str]:
        """Read a group part by part through ``buf`` (see :func:`~raydist_loader.store.chunks.read_in_parts`), with the
        load's retries; returns the whole chunks' digests."""
        hashes = [self._start_hash(r) for r in group]
        slot = self.plan.tensors[group[0].tensor]
        read_in_parts(
            group, slot, buf, self.part_bytes, lambda requests: self._read(conn, requests), hashes, place,
            conn.max_request_bytes,
        )
        return [h.hexdigest() for h in hashes]

    def _place_rows(self, read: ChunkRead, r0: int, r1: int, data: torch.Tensor) -> None:
        """Rows [r0, r1) of a chunk (as :meth:`_rows` counts them) into its place. Host to host with numpy: parts
        make many moderate copies, and torch's intra-op thread pool costs more than it gains on each of those
        (measured: 3x slower on a busy 2-core host)."""
        dest = self._region(read).view(self._rows(read)[0], -1)[r0:r1]
        if dest.device.type == "cpu":
            np.copyto(dest.numpy(), data.view(dest.shape).numpy())
        else:
            dest.copy_(data.view(dest.shape), non_blocking=data.is_pinned())

    # ---------------------------------------------------------------- bytes shared with peer replicas (share.py)
    def runs(self, reads: Sequence[ChunkRead]) -> list[list[ChunkRead]]:
        """``reads`` as they travel between replicas of this rank (whose arenas have the same layout): chunks
        adjacent in the arena as one span, every other chunk (column block, in-place extract) alone."""
        runs: list[list[ChunkRead]] = []
        for read in reads:
            last = runs[-1][-1] if runs else None
            if last and last.direct and read.direct and self._adjacent(last, read):
                runs[-1].append(read)
            else:
                runs.append([read])
        return runs

    def export(self, run: list[ChunkRead]) -> torch.Tensor:
        """A run's bytes on the host (uint8): a view of the arena span on CPU, a copy from a GPU; a lone chunk
        that is not contiguous in the arena as its row-major bytes (what its digest covers)."""
        if run[0].direct:
            data = self._arena[self._arena_span(run[0])[0] : self._arena_span(run[-1])[1]]
        else:
            data = self._region(run[0]).contiguous().view(-1)
        return data.cpu()

    def accept(self, run: list[ChunkRead], data: torch.Tensor) -> list[torch.Tensor]:
        """Place a run's bytes received from a peer (as :meth:`export` made them); returns each chunk's bytes to
        hash: its place in the arena on CPU, what arrived (on the host) for a GPU arena."""
        if run[0].direct:
            start = self._arena_span(run[0])[0]
            dest = self._arena[start : start + data.numel()]
            dest.copy_(data)
            held = dest if self.device.type == "cpu" else data
            chunks = [held[a - start : b - start] for a, b in map(self._arena_span, run)]
        else:
            self._place(run[0], data)
            chunks = [data]
        with self._lock:
            self._done += sum(r.nbytes for r in run)
        return chunks

    def _allocate(self) -> None:
        """One arena on the final device, a flat uint8 view per slot: reads (CPU) or H2D copies (GPU) land in place,
        and chunks of consecutive tensors are adjacent, so the GPU path moves them with one copy."""
        self._offsets, size = [], 0
        for slot in self.plan.tensors:
            self._offsets.append(size)
            size += -(-slot.nbytes // _ALIGN) * _ALIGN
        try:
            self._arena = torch.empty(size, dtype=torch.uint8, device=self.device)  # one allocation per rank
        except (RuntimeError, MemoryError) as e:  # torch's allocator message is long and C++-framed: first line
            raise ShardingError(
                f"rank {self.rank}: cannot allocate its shard of {size} bytes on {self.device} "
                f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}): load at a larger tp, on a "
                "device with more memory, or check that the manifest's shapes are the model's"
            ) from None
        self._flat = [self._arena[o : o + s.nbytes] for o, s in zip(self._offsets, self.plan.tensors, strict=True)]

    def _stage(self, group: list[ChunkRead], stage: torch.Tensor, conn: Connector):
        """Read a group into ``stage`` (pinned) and hash it; returns the digests and the H2D copy to issue."""
        if len(group) > 1 and self._columns(group):
            return self._stage_columns(group, stage, conn)
        if not self._arena_run(group[0]):  # chunks sharing one span: read once, cut each, place each
            self._read(conn, list(requests_for(group[0], stage, conn.max_request_bytes)))
            chunks = [stage if r.extract is None else cut(stage, r.extract) for r in group]

            def place() -> None:
                for r, c in zip(group, chunks, strict=True):
                    self._place(r, c)

            return [self._hash(c, r) for r, c in zip(group, chunks, strict=True)], place
        start = self._arena_span(group[0])[0]
        views = [stage[a - start : b - start] for a, b in map(self._arena_span, group)]
        self._read(
            conn, [q for r, v in zip(group, views, strict=True) for q in requests_for(r, v, conn.max_request_bytes)]
        )
        end = self._arena_span(group[-1])[1]
        return [self._hash(v, r) for r, v in zip(group, views, strict=True)], lambda: self._arena[start:end].copy_(
            stage, non_blocking=True
        )

    def _stage_columns(self, group: list[ChunkRead], stage: torch.Tensor, conn: Connector):
        """All column blocks of one tensor: read back to back into the first half of ``stage``, hashed there,
        assembled row-major in the second half (a host copy), then ONE H2D copy of the whole tensor."""
        index = group[0].tensor
        n = self.plan.tensors[index].nbytes
        raw, assembled = stage[:n], stage[n : 2 * n]
        views, pos = [], 0
        for r in group:
            views.append(raw[pos : pos + r.nbytes])
            pos += r.nbytes
        self._read(
            conn, [q for r, v in zip(group, views, strict=True) for q in requests_for(r, v, conn.max_request_bytes)]
        )
        digests = [self._hash(v, r) for r, v in zip(group, views, strict=True)]
        for r, v in zip(group, views, strict=True):
            block = self._region(r, flat=assembled)
            block.copy_(v.view(block.shape))
        start = self._offsets[index]
        return digests, lambda: self._arena[start : start + n].copy_(assembled, non_blocking=True)

    def _arena_run(self, read: ChunkRead) -> bool:
        return read.direct and read.extract is None

    def _arena_span(self, read: ChunkRead) -> tuple[int, int]:
        """[start, end) of a contiguous chunk in the rank's arena."""
        start = self._offsets[read.tensor] + read.dest * _inner_bytes(self.plan.tensors[read.tensor])
        return start, start + read.nbytes

    def _adjacent(self, prev: ChunkRead, read: ChunkRead) -> bool:
        """``read`` starts where ``prev`` ends in the arena, or ``prev`` ends its tensor and ``read`` starts the next
        one (the gap between them is alignment padding)."""
        end, start = self._arena_span(prev)[1], self._arena_span(read)[0]
        if start == end:
            return True
        ends_tensor = end == self._offsets[prev.tensor] + self.plan.tensors[prev.tensor].nbytes
        return ends_tensor and read.tensor == prev.tensor + 1 and start == self._offsets[read.tensor]

    def _columns(self, group: list[ChunkRead], *, whole: bool = True) -> bool:
        """A group of column blocks (row-parallel chunks at tp < max_tp) of one tensor, all of them if ``whole``."""
        first = group[0]
        same = all(not r.direct and r.extract is None and r.tensor == first.tensor for r in group)
        return same and (not whole or sum(r.nbytes for r in group) == self.plan.tensors[first.tensor].nbytes)

    def _read(self, conn: Connector, requests: list[ReadRequest]) -> None:
        """One batch of reads, with transient backend errors retried under the load's policy."""
        what = f"rank {self.rank}: reading {len(requests)} range(s) from {conn.describe()}"
        with_retries(lambda: conn.readinto_many(requests), self.retry_policy, what=what)

    def _region(
        self, read: ChunkRead, tensors: dict[str, torch.Tensor] | None = None, *, flat: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The chunk's place in the rank tensor (its arena bytes, ``tensors``' final tensor, or a ``flat`` uint8
        buffer laid out like it): a flat slice when contiguous, else an [outer, cols] block."""
        slot = self.plan.tensors[read.tensor]
        if flat is None:
            flat = self._flat[read.tensor] if tensors is None else tensors[slot.name].reshape(-1).view(torch.uint8)
        start = read.dest * _inner_bytes(slot)
        if read.direct:
            return flat[start : start + read.nbytes]
        outer = prod(slot.shape[: slot.dim])
        return flat.view(outer, -1)[:, start : start + read.nbytes // outer]

    def _place(self, read: ChunkRead, chunk: torch.Tensor) -> None:
        """A staged chunk into its place. Host to host with numpy, as :meth:`_place_rows`: a torch copy wakes the
        intra-op thread pool, whose threads then spin for the CPU the store's server (on the same host) needs."""
        region = self._region(read)
        if region.device.type == "cpu" and chunk.device.type == "cpu":
            np.copyto(region.numpy(), chunk.view(region.shape).numpy())
        else:
            region.copy_(chunk.view(region.shape), non_blocking=chunk.is_pinned())

    def _expose(self) -> None:
        """The flat buffers viewed as the tensors the engine gets (no copy)."""
        for slot, flat in zip(self.plan.tensors, self._flat, strict=True):
            shape_ok = slot.nbytes and flat.numel() == slot.nbytes
            self.tensors[slot.name] = (
                flat.view(dtypes.torch_dtype(slot.dtype)).view(slot.shape)
                if shape_ok
                else torch.empty(slot.shape, dtype=dtypes.torch_dtype(slot.dtype), device=self.device)
            )


class Ring:
    """A bounded pool of staging buffers (pinned for GPU copies); a buffer comes back with the CUDA event of its
    last copy, if any. Staging memory is at most ``slots x size``, whatever the shard's size."""

    def __init__(self, slots: int, size: int, *, pin: bool = True):
        self._free: queue.Queue = queue.Queue()
        try:
            for _ in range(slots):
                self._free.put((torch.empty(size, dtype=torch.uint8, pin_memory=pin), None))
        except (RuntimeError, MemoryError) as e:
            raise ConfigError(
                f"cannot allocate {slots} staging buffers of {size} bytes{' (pinned)' if pin else ''}: "
                f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}; lower concurrency"
            ) from None

    def acquire(self) -> torch.Tensor:
        buf, event = self._free.get()
        if event is not None:
            event.synchronize()  # the previous H2D copy out of this buffer has finished
        return buf

    def release(self, buf: torch.Tensor, event) -> None:
        self._free.put((buf, event))


def _inner_bytes(slot: TensorSlot) -> int:
    if slot.dim is None:
        return 0
    return prod(slot.shape[slot.dim + 1 :]) * dtypes.itemsize(slot.dtype)
