"""Layer 3 (load): GPU copy path (below the worker: extends transfer.py): pinned staging ring, one non-blocking
H2D copy per run.

Runs of chunks that are adjacent in the rank's arena are read into one pinned buffer of a bounded ring, hashed
there, and sent with ONE non-blocking H2D copy on the thread's stream; a buffer is reused only after its copy's
event completed. Staging memory is at most (concurrency + 1) buffers whatever the shard's size, each at most
:data:`~raydist_loader.store.chunks.PART_BYTES`: a larger chunk or span is read, hashed and copied in parts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..pool import run_all
from ..store.plan import ChunkRead
from .transfer import Ring, Transfer


class GpuTransfer(Transfer):
    """Fills a CUDA arena."""

    def _pull(self, reads: Sequence[ChunkRead], concurrency: int) -> dict[tuple[int, str], str]:
        """GPU: runs of chunks that are adjacent in the rank's arena are read into one pinned buffer of a bounded
        ring, hashed there, and sent with ONE non-blocking H2D copy on the thread's stream; a buffer is reused only
        after its copy's event completed. Other chunks (column blocks, in-place extracts) go one at a time."""
        with torch.cuda.device(self.device):  # pinned buffers, the final synchronize: on the target device
            return self._pull_on_device(reads, concurrency)

    def _pull_on_device(self, reads: Sequence[ChunkRead], concurrency: int) -> dict[tuple[int, str], str]:
        conn = self.connector
        groups = self._groups(reads)
        # as many staging buffers as reads can be in flight for this shard, not as the knob alone allows
        slots = min(concurrency, len(groups)) + 1
        ring = Ring(slots, max((self._stage_size(g, self._group_bytes(g)) for g in groups), default=0))
        local = threading.local()

        def one(group: list[ChunkRead]) -> list[str]:
            if not hasattr(local, "stream"):
                # each copy thread's current device is the target before its stream, events and copies exist:
                # a thread starts on device 0, whatever the engine's process set in its own main thread
                torch.cuda.set_device(self.device)
                local.stream = torch.cuda.Stream(self.device)
            buf = ring.acquire()
            event = None
            try:
                if self._in_parts(group):  # each part's copy completes before the next part refills the buffer
                    digests = self._stream(group, buf, conn, lambda *part: self._place_part(local.stream, *part))
                else:
                    digests, copy = self._stage(group, buf[: self._group_bytes(group)], conn)
                    with torch.cuda.stream(local.stream):
                        copy()
                        event = torch.cuda.Event()
                        event.record(local.stream)
            finally:
                ring.release(buf, event)
            with self._lock:
                self._done += sum(r.nbytes for r in group)
            return digests

        results = run_all(one, groups, concurrency, f"rank{self.rank}")
        torch.cuda.synchronize(self.device)
        return {
            (r.tensor, r.chunk): d for g, ds in zip(groups, results, strict=True) for r, d in zip(g, ds, strict=True)
        }

    def _place_part(self, stream, read: ChunkRead, r0: int, r1: int, data: torch.Tensor) -> None:
        """One part of a chunk read in parts: copied on the thread's stream, waited for (its buffer is reused)."""
        with torch.cuda.stream(stream):
            self._place_rows(read, r0, r1, data)
            event = torch.cuda.Event()
            event.record(stream)
        event.synchronize()

    def _groups(self, reads: Sequence[ChunkRead], target: int = 32 << 20) -> list[list[ChunkRead]]:
        """Runs of arena-contiguous chunks up to ``target`` bytes. Two chunks join only when the second starts
        where the first ends, or when the first ends its tensor and the second starts the next one (the gap is
        alignment padding): one H2D copy of the run must never cover bytes of a chunk outside it."""
        target = min(target, self.part_bytes)
        groups: list[list[ChunkRead]] = []
        run: list[ChunkRead] = []
        reads = list(reads)
        for read in reads:
            if not self._arena_run(read):
                groups += [run] if run else []
                run = []
                last = groups[-1] if groups and not self._arena_run(groups[-1][0]) else None
                if last and (last[0].pieces == read.pieces or self._columns(last + [read], whole=False)):
                    last.append(read)  # shares the previous chunk's span, or is the next column block
                else:
                    groups.append([read])
                continue
            too_big = run and self._arena_span(read)[1] - self._arena_span(run[0])[0] > target
            if run and (too_big or not self._adjacent(run[-1], read)):
                groups.append(run)
                run = []
            run.append(read)
        groups += [run] if run else []
        # column blocks go as one assembled tensor only when the group holds all of them (not in a re-pull) and the
        # raw and assembled copies fit one staging buffer; else one block at a time (in parts when large)
        return [
            g
            for grp in groups
            for g in (
                [grp]
                if len(grp) == 1 or not self._columns(grp, whole=False) or self._assembled(grp)
                else [[r] for r in grp]
            )
        ]

    def _assembled(self, group: list[ChunkRead]) -> bool:
        """All column blocks of one tensor, small enough to be assembled in one staging buffer."""
        return self._columns(group) and 2 * self.plan.tensors[group[0].tensor].nbytes <= self.part_bytes

    def _group_bytes(self, group: list[ChunkRead]) -> int:
        if len(group) > 1 and self._columns(group):
            return 2 * self.plan.tensors[group[0].tensor].nbytes
        if not self._arena_run(group[0]):
            return group[0].read_bytes
        return self._arena_span(group[-1])[1] - self._arena_span(group[0])[0]
