"""The per-rank loader: a plain class (no ``@ray.remote``), made remote only by the coordinator.

It opens its own connector, runs its plan with a bounded thread pool (I/O releases the GIL), lands every read in
preallocated tensors, hashes each chunk as soon as its bytes are in (overlapping further reads) and reports. The same
class runs inside an engine's own worker process through :func:`raydist_loader.api.load_shard`, without Ray.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from typing import Any, Literal

import torch

from . import digest, dtypes
from .connectors import Connector, ReadRequest, open_connector
from .manifest import Manifest
from .plan import ChunkRead, Extract, RankPlan, TensorSlot, make_plan
from .redact import redact_text, redact_url

Verify = bool | Literal["full"]


@dataclass
class _Landing:
    """Where one chunk's read buffer lives while it is in flight."""

    read: ChunkRead
    buffer: torch.Tensor  # uint8, holds the pieces back to back (the destination itself when direct)
    pending: int
    staged: bool


class ShardLoader:
    """Loads one TP rank's shard from a store. Construct, then ``load()``; tensors stay in this process."""

    def __init__(
        self,
        url: str,
        manifest_json: bytes,
        tp: int,
        rank: int,
        *,
        device: str = "cpu",
        concurrency: int | None = None,
        verify: Verify = True,
        connector_options: dict | None = None,
    ):
        self._url = url
        self._options = connector_options or {}
        self.manifest = Manifest.from_json(manifest_json)
        self.tp, self.rank = tp, rank
        self.device = _resolve_device(device)
        self.verify = verify
        self._concurrency = concurrency
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

    def load(self) -> dict:
        """Pull this rank's shard; returns the report (digests included). Never raises on a digest mismatch:
        the report lists the failed chunks so the caller can re-pull them."""
        started = time.time()
        t0 = time.perf_counter()
        self.plan = make_plan(self.manifest, self.tp, self.rank, coalesce_gap=self.connector.coalesce_gap)
        self._allocate()
        digests = self._pull(self.plan.reads)
        seconds = time.perf_counter() - t0
        return self._report(digests, started, seconds)

    def repull(self, chunks: Sequence[tuple[str, str]]) -> dict:
        """Read the named (tensor, chunk id) pairs again (after a digest mismatch) and return a fresh report."""
        assert self.plan is not None, "load() first"
        wanted = set(chunks)
        redo = [r for r in self.plan.reads if (self.plan.tensors[r.tensor].name, r.chunk) in wanted]
        t0 = time.perf_counter()
        self._digests.update(self._pull(redo))
        return self._report(self._digests, time.time(), time.perf_counter() - t0)

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
        assert self.plan is not None
        pin = self.device.type == "cuda"
        self._flat = [torch.empty(s.nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin) for s in self.plan.tensors]
        self.tensors = {}
        self._digests: dict[tuple[int, str], str] = {}

    def _pull(self, reads: Sequence[ChunkRead]) -> dict[tuple[int, str], str]:
        """Read the chunks, hash each as it completes, place it. Returns (tensor index, chunk) -> digest."""
        conn = self.connector
        concurrency = self._concurrency or conn.default_concurrency
        landings = [self._landing(r) for r in reads]
        batches = _batches(landings, conn.max_request_bytes)
        digests = {(x.read.tensor, x.read.chunk): self._finish(x) for x in landings if x.pending == 0}  # empty

        def run(batch: list[tuple[_Landing, ReadRequest]]) -> None:
            conn.readinto_many([req for _, req in batch])
            for landing, req in batch:
                with self._lock:
                    landing.pending -= 1
                    self._done += len(req.buf)
                    finished = landing.pending == 0
                if finished:
                    digests[(landing.read.tensor, landing.read.chunk)] = self._finish(landing)

        with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix=f"rank{self.rank}") as pool:
            for f in [pool.submit(run, b) for b in batches]:
                f.result()
        self._place_on_device()
        if self.verify == "full":
            digests = self._rehash_final(reads)
        return digests

    def _landing(self, read: ChunkRead) -> _Landing:
        if read.direct and read.extract is None:
            slot = self.plan.tensors[read.tensor]
            start = read.dest * _inner_bytes(slot)
            return _Landing(read, self._flat[read.tensor][start : start + read.nbytes], 0, False)
        return _Landing(read, torch.empty(read.read_bytes, dtype=torch.uint8), 0, True)

    def _finish(self, landing: _Landing) -> str:
        """All pieces of a chunk are in: cut it out, hash it, copy it into place when it was staged."""
        read = landing.read
        chunk = landing.buffer if read.extract is None else _cut(landing.buffer, read.extract)
        got = digest.xxh3(chunk.numpy()) if self.verify else read.xxh3
        if landing.staged:
            self._place(read, chunk)
        return got

    def _place(self, read: ChunkRead, chunk: torch.Tensor) -> None:
        slot = self.plan.tensors[read.tensor]
        flat = self._flat[read.tensor]
        inner = _inner_bytes(slot)
        if read.direct:
            flat[read.dest * inner : read.dest * inner + read.nbytes].copy_(chunk)
            return
        outer = prod(slot.shape[: slot.dim])
        cols = read.nbytes // outer
        flat.view(outer, -1)[:, read.dest * inner : read.dest * inner + cols].copy_(chunk.view(outer, cols))

    def _place_on_device(self) -> None:
        for slot, flat in zip(self.plan.tensors, self._flat, strict=True):
            t = flat.view(dtypes.torch_dtype(slot.dtype)).view(slot.shape) if slot.nbytes else _empty(slot)
            if self.device.type != "cpu":
                t = t.to(self.device, non_blocking=True)
            self.tensors[slot.name] = t
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _rehash_final(self, reads: Sequence[ChunkRead]) -> dict[tuple[int, str], str]:
        """verify="full": hash each chunk again from the final (device) tensors."""
        out = {}
        for read in reads:
            slot = self.plan.tensors[read.tensor]
            flat = (
                self.tensors[slot.name].reshape(-1).view(torch.uint8)
                if slot.nbytes
                else torch.empty(0, dtype=torch.uint8)
            )
            inner = _inner_bytes(slot)
            if read.direct:
                chunk = flat[read.dest * inner : read.dest * inner + read.nbytes]
            else:
                outer = prod(slot.shape[: slot.dim])
                cols = read.nbytes // outer
                chunk = flat.view(outer, -1)[:, read.dest * inner : read.dest * inner + cols]
            out[(read.tensor, read.chunk)] = digest.xxh3(chunk.contiguous().cpu().numpy())
        return out

    def _report(self, digests: dict[tuple[int, str], str], started: float, seconds: float) -> dict:
        plan = self.plan
        self._digests = digests
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
        rank_digest = digest.rank_digest(digests.get((r.tensor, r.chunk), "") for r in plan.reads)
        node = self.node()
        return {
            "rank": self.rank,
            "tp": self.tp,
            "model": plan.model,
            "version": plan.version,
            "host": node["host"],
            "node_id": node["node_id"],
            "gpu_ids": node["gpu_ids"],
            "device": str(self.device),
            "store": redact_url(self._url),
            "bytes": plan.bytes_kept,
            "bytes_read": plan.bytes_read,
            "staged_bytes": sum(r.nbytes for r in plan.reads if not r.direct or r.extract),
            "chunks": len(plan.reads),
            "started": started,
            "finished": started + seconds,
            "seconds": seconds,
            "gbps": plan.bytes_kept / seconds / 1e9 if seconds else 0.0,
            "verify": self.verify,
            "digest": rank_digest,
            "expected_digest": plan.expected_digest,
            "failures": failures,
            "errors": [],
        }


def _batches(landings: list[_Landing], max_bytes: int) -> list[list[tuple[_Landing, ReadRequest]]]:
    """Cut every chunk's pieces into requests of at most ``max_bytes`` and group small ones into batches of
    about that size, so big chunks are read by several threads and small tensors cost one call per batch."""
    batches: list[list[tuple[_Landing, ReadRequest]]] = [[]]
    size = 0
    for landing in landings:
        buf, pos = landing.buffer, 0
        for piece in landing.read.pieces:
            for off in range(0, max(piece.nbytes, 1), max_bytes):
                n = min(max_bytes, piece.nbytes - off)
                if n <= 0:
                    continue
                req = ReadRequest(piece.key, piece.offset + off, memoryview(buf[pos : pos + n].numpy()))
                landing.pending += 1
                pos += n
                if size and size + n > max_bytes:
                    batches.append([])
                    size = 0
                batches[-1].append((landing, req))
                size += n
    return [b for b in batches if b]


def _inner_bytes(slot: TensorSlot) -> int:
    if slot.dim is None:
        return 0
    return prod(slot.shape[slot.dim + 1 :]) * dtypes.itemsize(slot.dtype)


def _empty(slot: TensorSlot) -> torch.Tensor:
    return torch.empty(slot.shape, dtype=dtypes.torch_dtype(slot.dtype))


def _resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when this process sees a GPU, else cpu (logical Ray GPUs in tests have none)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def safe_error(exc: BaseException, url: str) -> str:
    """An exception as one line with the store's secrets redacted (for reports)."""
    return redact_text(f"{type(exc).__name__}: {exc}", secrets=(url,)) if url else f"{type(exc).__name__}: {exc}"


def fetch_chunk(conn: Connector, read: ChunkRead) -> torch.Tensor:
    """Read one chunk into a fresh buffer and return its row-major bytes (verify and tools; not the hot path)."""
    buf = torch.empty(read.read_bytes, dtype=torch.uint8)
    view, pos, requests = buf.numpy(), 0, []
    for p in read.pieces:
        requests.append(ReadRequest(p.key, p.offset, memoryview(view[pos : pos + p.nbytes])))
        pos += p.nbytes
    conn.readinto_many(requests)
    return buf if read.extract is None else _cut(buf, read.extract)


def _cut(span: torch.Tensor, e: Extract) -> torch.Tensor:
    """The chunk's contiguous bytes out of a coalesced span of strided rows."""
    return span.as_strided((e.rows, e.length), (e.stride, 1), e.skip).contiguous().view(-1)
