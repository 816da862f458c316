"""The per-rank loader: a plain class (no ``@ray.remote``), made remote only by the coordinator.

It opens its own connector, runs its plan with a bounded thread pool (I/O releases the GIL), lands every read in
preallocated tensors, hashes each chunk as soon as its bytes are in (overlapping further reads) and reports. The same
class runs inside an engine's own worker process through :func:`raydist_loader.api.load_shard`, without Ray.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from . import digest, dtypes
from .chunks import cut, requests_for, shared
from .connectors import Connector, ReadRequest, open_connector
from .manifest import Manifest
from .options import DEFAULTS, Verify
from .plan import ChunkRead, RankPlan, TensorSlot, make_plan
from .pool import run_all
from .redact import redact_url
from .report import RankReport
from .retry import RetryPolicy, coerce_policy
from .retry import call as with_retries

_ALIGN = 256  # every tensor starts 256-byte aligned in the arena


@dataclass
class _Landing:
    """Where one chunk's read buffer lives while it is in flight."""

    read: ChunkRead
    buffer: torch.Tensor  # uint8: the chunk's place in the rank's arena
    pending: int  # requests not yet landed


class ShardLoader:
    """Loads one TP rank's shard from a store. Construct, then ``load()``; tensors stay in this process."""

    def __init__(
        self,
        url: str,
        manifest_json: bytes,
        tp: int,
        rank: int,
        *,
        device: str = DEFAULTS.device,
        concurrency: int | None = DEFAULTS.concurrency,
        verify: Verify = DEFAULTS.verify,
        connector_options: dict | None = None,
        retries: RetryPolicy | dict | None = None,
    ):
        """``retries``: a RetryPolicy or its fields as a dict; None: the default policy."""
        self._url = url
        self._options = connector_options or {}
        self.manifest = Manifest.from_json(manifest_json)
        self.tp, self.rank = tp, rank
        self.device = _resolve_device(device)
        self.verify = verify
        self._concurrency = concurrency
        self.retry_policy = coerce_policy(retries)
        self._connector: Connector | None = None
        self.plan: RankPlan | None = None
        self._flat: list[torch.Tensor] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self._done = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show credentials handed in through connector_options
        return f"ShardLoader({redact_url(self._url)!r}, model={self.manifest.model!r}, rank={self.rank}/{self.tp})"

    # ---------------------------------------------------------------- public
    @property
    def connector(self) -> Connector:
        if self._connector is None:
            self._connector = open_connector(self._url, **self._options)
        return self._connector

    def node(self) -> dict:
        """Where this rank runs: host, Ray node id and GPU ids (when under Ray)."""
        info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": None, "gpu_ids": []}
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                info["node_id"] = ctx.get_node_id()
                info["gpu_ids"] = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        except Exception:  # noqa: BLE001 - outside Ray there is simply no node id
            pass
        return info

    def prepare(self) -> dict:
        """Open the connector and make the plan ahead of the load (the coordinator calls it on every actor
        before any starts reading, so ranks start together); returns where this rank runs."""
        if self.plan is None:
            self.plan = make_plan(self.manifest, self.tp, self.rank, coalesce_gap=self.connector.coalesce_gap)
        return self.node()

    def load(self) -> RankReport:
        """Pull this rank's shard, hash every chunk as it lands and compare it with the manifest's digest, re-pull
        the wrong chunks once (a corruption in transit heals, one in the store does not) and report. Never raises
        on a mismatch: the report's ``failures`` name what stayed wrong, and the caller raises
        (:func:`~raydist_loader.report.check_verified`)."""
        started = time.time()
        t0 = time.perf_counter()
        self.prepare()
        t1 = time.perf_counter()
        self._allocate()
        t2 = time.perf_counter()
        self._digests = self._pull(self.plan.reads)
        t3 = time.perf_counter()
        self._phases = {"plan_s": t1 - t0, "alloc_s": t2 - t1, "pull_s": t3 - t2}
        wrong = [r for r in self.plan.reads if self._digests.get((r.tensor, r.chunk)) != r.xxh3]
        if self.verify and wrong:
            self._digests.update(self._pull(wrong))
        return self._report(started, time.perf_counter() - t0, repulled=len(wrong) if self.verify else 0)

    def repull(self, chunks: Sequence[tuple[str, str]]) -> RankReport:
        """Read the named (tensor, chunk id) pairs again and return a fresh report (tools and tests; ``load``
        already re-pulls what failed once)."""
        assert self.plan is not None, "load() first"
        wanted = set(chunks)
        redo = [r for r in self.plan.reads if (self.plan.tensors[r.tensor].name, r.chunk) in wanted]
        t0 = time.perf_counter()
        self._digests.update(self._pull(redo))
        return self._report(time.time(), time.perf_counter() - t0, repulled=len(redo))

    def progress(self) -> tuple[int, int]:
        """(bytes landed, bytes planned) so far."""
        total = self.plan.bytes_kept if self.plan else 0
        return self._done, total

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(rank, tensors, *args)`` here, next to the shard (the engine hand-off)."""
        return fn(self.rank, self.tensors, *args)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of this rank's tensors (tests and tools; the load path never copies)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.tensors.items()}

    def metadata(self) -> dict[str, dict]:
        assert self.plan is not None, "load() first"
        return {s.name: s.meta() for s in self.plan.tensors}

    def close(self) -> None:
        if self._connector is not None:
            self._connector.close()
            self._connector = None

    # ---------------------------------------------------------------- internals
    def _allocate(self) -> None:
        """One arena on the final device, a flat uint8 view per slot: reads (CPU) or H2D copies (GPU) land in place,
        and chunks of consecutive tensors are adjacent, so the GPU path moves them with one copy."""
        assert self.plan is not None
        self._offsets, size = [], 0
        for slot in self.plan.tensors:
            self._offsets.append(size)
            size += -(-slot.nbytes // _ALIGN) * _ALIGN
        self._arena = torch.empty(size, dtype=torch.uint8, device=self.device)  # one allocation per rank
        self._flat = [self._arena[o : o + s.nbytes] for o, s in zip(self._offsets, self.plan.tensors, strict=True)]
        self.tensors = {}
        self._digests: dict[tuple[int, str], str] = {}

    def _pull(self, reads: Sequence[ChunkRead]) -> dict[tuple[int, str], str]:
        """Read the chunks, hash each as it completes, place it. Returns (tensor index, chunk) -> digest."""
        concurrency = max(1, self._concurrency or self.connector.default_concurrency)
        pull = self._pull_staged if self.device.type == "cuda" else self._pull_direct
        empty = torch.empty(0, dtype=torch.uint8)  # zero-size tensors: no bytes to read or place
        digests = {(r.tensor, r.chunk): self._hash(empty, r) for r in reads if not r.nbytes}
        digests.update(pull([r for r in reads if r.nbytes], concurrency))
        self._expose()
        if self.verify == "full":
            digests = {(r.tensor, r.chunk): self._hash(self._region(r, self.tensors)) for r in reads}
        return digests

    def _pull_direct(self, reads: Sequence[ChunkRead], concurrency: int) -> dict[tuple[int, str], str]:
        """CPU: contiguous chunks are read straight into the tensors; column blocks and in-place extracts ride in
        the same batches into a staging slot (one per thread, ``max_request_bytes``), then are cut, hashed and
        copied into place. Batches follow object and offset order, so back-to-back ranges are one request.
        Staged chunks larger than a slot go alone through a ring of their own."""
        conn = self.connector
        limit = conn.max_request_bytes
        direct = [_Landing(r, self._region(r), 0) for r in reads if self._arena_run(r)]
        groups = shared([r for r in reads if not self._arena_run(r)])
        staged = [g for g in groups if g[0].read_bytes <= limit]
        big = [g for g in groups if g[0].read_bytes > limit]
        slots = _Ring(concurrency if staged else 0, limit, pin=False)
        ring = _Ring(min(2, len(big)), max((g[0].read_bytes for g in big), default=0), pin=False)
        digests: dict[tuple[int, str], str] = {}

        def run(task: _Batch | list[ChunkRead]) -> None:
            if isinstance(task, list):
                digests.update(self._staged_group(task, ring, conn))
            else:
                digests.update(self._run_batch(task, slots, conn))

        run_all(run, [*_batches(direct, staged, limit), *big], concurrency, f"rank{self.rank}")
        return digests

    def _run_batch(self, batch: _Batch, slots: _Ring, conn: Connector) -> dict[tuple[int, str], str]:
        """One batch: direct requests and whole staged chunks, read with one ``readinto_many``."""
        requests = [req for _, req in batch.direct]
        slot = slots.acquire() if batch.staged else None
        views, pos = [], 0
        try:
            for group in batch.staged:
                views.append(slot[pos : pos + group[0].read_bytes])
                requests.extend(requests_for(group[0], views[-1], conn.max_request_bytes))
                pos += group[0].read_bytes
            requests.sort(key=lambda q: (q.key, q.offset))
            self._read(conn, requests)
            out = {}
            for group, view in zip(batch.staged, views, strict=True):
                for read in group:
                    chunk = view if read.extract is None else cut(view, read.extract)
                    out[(read.tensor, read.chunk)] = self._hash(chunk, read)
                    self._place(read, chunk)
        finally:
            if slot is not None:
                slots.release(slot, None)
        with self._lock:
            self._done += sum(r.nbytes for g in batch.staged for r in g)
        for landing, req in batch.direct:
            with self._lock:
                landing.pending -= 1
                self._done += len(req.buf)
                finished = landing.pending == 0
            if finished:
                out[(landing.read.tensor, landing.read.chunk)] = self._hash(landing.buffer, landing.read)
        return out

    def _staged_group(self, group: list[ChunkRead], ring: _Ring, conn: Connector) -> dict[tuple[int, str], str]:
        """Chunks sharing one span too big for a batch slot: read it once through the ring, cut each."""
        buf = ring.acquire()
        try:
            digests, copy = self._stage(group, buf[: group[0].read_bytes], conn)
            copy()
        finally:
            ring.release(buf, None)
        with self._lock:
            self._done += sum(r.nbytes for r in group)
        return {(r.tensor, r.chunk): d for r, d in zip(group, digests, strict=True)}

    def _pull_staged(self, reads: Sequence[ChunkRead], concurrency: int) -> dict[tuple[int, str], str]:
        """GPU: runs of chunks that are adjacent in the rank's arena are read into one pinned buffer of a bounded
        ring, hashed there, and sent with ONE non-blocking H2D copy on the thread's stream; a buffer is reused only
        after its copy's event completed. Other chunks (column blocks, in-place extracts) go one at a time."""
        conn = self.connector
        groups = self._groups(reads)
        ring = _Ring(concurrency + 1, max((self._group_bytes(g) for g in groups), default=0))
        local = threading.local()

        def one(group: list[ChunkRead]) -> list[str]:
            if not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream(self.device)
            buf = ring.acquire()
            event = None
            try:
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

    def _groups(self, reads: Sequence[ChunkRead], target: int = 32 << 20) -> list[list[ChunkRead]]:
        """Runs of arena-contiguous chunks up to ``target`` bytes. Two chunks join only when the second starts
        where the first ends, or when the first ends its tensor and the second starts the next one (the gap is
        alignment padding): one H2D copy of the run must never cover bytes of a chunk outside it."""
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
        # column blocks go as one assembled tensor only when the group holds all of them (not in a re-pull)
        return [
            g
            for grp in groups
            for g in (
                [grp]
                if len(grp) == 1 or not self._columns(grp, whole=False) or self._columns(grp)
                else [[r] for r in grp]
            )
        ]

    def _columns(self, group: list[ChunkRead], *, whole: bool = True) -> bool:
        """A group of column blocks (row-parallel chunks at tp < max_tp) of one tensor, all of them if ``whole``."""
        first = group[0]
        same = all(not r.direct and r.extract is None and r.tensor == first.tensor for r in group)
        return same and (not whole or sum(r.nbytes for r in group) == self.plan.tensors[first.tensor].nbytes)

    def _adjacent(self, prev: ChunkRead, read: ChunkRead) -> bool:
        end, start = self._arena_span(prev)[1], self._arena_span(read)[0]
        if start == end:
            return True
        ends_tensor = end == self._offsets[prev.tensor] + self.plan.tensors[prev.tensor].nbytes
        return ends_tensor and read.tensor == prev.tensor + 1 and start == self._offsets[read.tensor]

    def _group_bytes(self, group: list[ChunkRead]) -> int:
        if len(group) > 1 and self._columns(group):
            return 2 * self.plan.tensors[group[0].tensor].nbytes
        if not self._arena_run(group[0]):
            return group[0].read_bytes
        return self._arena_span(group[-1])[1] - self._arena_span(group[0])[0]

    def _read(self, conn: Connector, requests: list[ReadRequest]) -> None:
        """One batch of reads, with transient backend errors retried under the load's policy."""
        what = f"rank {self.rank}: reading {len(requests)} range(s) from {conn.describe()}"
        with_retries(lambda: conn.readinto_many(requests), self.retry_policy, what=what)

    def _hash(self, chunk: torch.Tensor, read: ChunkRead | None = None) -> str:
        """The chunk's xxh3; where the manifest also records blake3 (tamper evidence), that is checked too and a
        mismatch reported as a digest that cannot equal the expected one."""
        if not self.verify and read is not None:
            return read.xxh3
        data = chunk.contiguous().cpu().numpy()
        got = digest.xxh3(data)
        if read is not None and read.blake3 and got == read.xxh3 and digest.blake3_hex(data) != read.blake3:
            return f"blake3-mismatch:{got}"
        return got

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
        region = self._region(read)
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

    def _report(self, started: float, seconds: float, repulled: int) -> RankReport:
        plan, digests = self.plan, self._digests
        failures = [
            {
                "rank": self.rank,
                "tensor": plan.tensors[r.tensor].name,
                "chunk": r.chunk,
                "expected": r.xxh3,
                "got": digests.get((r.tensor, r.chunk)),
            }
            for r in plan.reads
            if digests.get((r.tensor, r.chunk)) != r.xxh3
        ]
        node = self.node()
        return RankReport(
            rank=self.rank,
            tp=self.tp,
            model=plan.model,
            version=plan.version,
            host=node["host"],
            node_id=node["node_id"],
            gpu_ids=node["gpu_ids"],
            device=str(self.device),
            store=redact_url(self._url),
            bytes=plan.bytes_kept,
            bytes_read=plan.bytes_read,
            staged_bytes=sum(r.nbytes for r in plan.reads if not r.direct or r.extract),
            chunks=len(plan.reads),
            started=started,
            finished=started + seconds,
            seconds=seconds,
            gbps=plan.bytes_kept / seconds / 1e9 if seconds else 0.0,
            verify=self.verify,
            digest=digest.rank_digest(digests.get((r.tensor, r.chunk), "") for r in plan.reads),
            expected_digest=plan.expected_digest,
            failures=failures,
            phases=dict(getattr(self, "_phases", {})),  # plan_s, alloc_s, pull_s of the last load
            repulled=repulled,
        )


@dataclass
class _Batch:
    """What one thread reads in one go: requests landing in the tensors, and whole staged chunks."""

    direct: list[tuple[_Landing, ReadRequest]]
    staged: list[list[ChunkRead]]  # groups of chunks sharing one read
    size: int = 0


def _batches(landings: list[_Landing], staged: list[list[ChunkRead]], max_bytes: int) -> list[_Batch]:
    """Cut every direct chunk into requests of at most ``max_bytes``, and group them with the (whole) staged
    chunks, in object and offset order, into batches of about ``max_bytes``: big chunks are read by several
    threads, and chunks back to back in one object (a rank's slot file) become one request."""
    units: list[tuple[tuple[str, int], int, object]] = []
    for landing in landings:
        for req in requests_for(landing.read, landing.buffer, max_bytes):
            landing.pending += 1
            units.append(((req.key, req.offset), len(req.buf), (landing, req)))
    units += [((g[0].pieces[0].key, g[0].pieces[0].offset), g[0].read_bytes, g) for g in staged if g[0].pieces]
    units.sort(key=lambda u: u[0])
    batches = [_Batch([], [])]
    for _, size, unit in units:
        if batches[-1].size and batches[-1].size + size > max_bytes:
            batches.append(_Batch([], []))
        if isinstance(unit, list):
            batches[-1].staged.append(unit)
        else:
            batches[-1].direct.append(unit)
        batches[-1].size += size
    return [b for b in batches if b.size or b.direct or b.staged]


class _Ring:
    """A bounded pool of staging buffers (pinned for GPU copies); a buffer comes back with the CUDA event of its
    last copy, if any. Staging memory is at most ``slots x size``, whatever the shard's size."""

    def __init__(self, slots: int, size: int, *, pin: bool = True):
        self._free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._free.put((torch.empty(size, dtype=torch.uint8, pin_memory=pin), None))

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


def _resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when this process sees a GPU, else cpu (logical Ray GPUs in tests have none)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
