"""Layer 3 (load): The actor contract (imports plan, transfer*, report, never Ray): one TP rank's loader, a
plain class (no ``@ray.remote``), made remote only by the coordinator.

prepare (connector + plan), load (pull, hash every chunk as it lands, compare with the manifest's digests, re-pull
the wrong ones once, report), repull, run (the engine hand-off), report. The bytes move through
:mod:`~raydist_loader.load.transfer_cpu` or :mod:`~raydist_loader.load.transfer_gpu` (a bounded thread pool, reads
landing in one preallocated arena). The same class runs inside an engine's own worker process through
:func:`raydist_loader.api.load_shard`, without Ray.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import digest
from ..bulk import bulk
from ..connectors import Connector, open_connector
from ..errors import ConfigError
from ..options import DEFAULTS, Verify
from ..redact import redact_url
from ..report import RankReport
from ..retry import RetryPolicy, coerce_policy
from ..store.experts import Experts
from ..store.manifest import Manifest
from ..store.plan import ChunkRead, Layout, RankPlan, make_plan
from .transfer import Digests, Transfer
from .transfer_cpu import CpuTransfer
from .transfer_gpu import GpuTransfer


class ShardLoader:
    """Loads one TP rank's shard from a store. Construct, then ``load()``; tensors stay in this process."""

    def __init__(
        self,
        url: str,
        source: RankPlan | Manifest | bytes,
        tp: int,
        rank: int,
        *,
        device: str = DEFAULTS.device,
        concurrency: int | None = DEFAULTS.concurrency,
        verify: Verify = DEFAULTS.verify,
        connector_options: dict | None = None,
        retries: RetryPolicy | dict | None = None,
        only: Callable[[str], bool] | None = None,
        layout: Layout = "rank",
        connector: Connector | None = None,
        experts: Experts | None = None,
    ):
        """``source``: this rank's plan, made by the driver (:func:`~raydist_loader.store.plan.make_plans`: the actor
        neither parses nor plans), or the manifest (parsed, or its JSON) to plan from. ``retries``: a RetryPolicy
        or its fields as a dict; None: the default policy. ``only``, ``layout`` and ``experts``: which tensors,
        landing where (see :func:`~raydist_loader.store.plan.make_plan`), when the loader makes its plan.
        ``connector``: an open connector for ``url`` to use (and close) instead of opening one (``load_shard`` read
        the manifest through it: one client per load, not two)."""
        self._url = url
        self._select = {"only": only, "layout": layout, "experts": experts}
        self._options = connector_options or {}
        self.tp, self.rank = tp, rank
        self.plan: RankPlan | None = None
        self.manifest: Manifest | None = None
        if isinstance(source, RankPlan):
            if (source.tp, source.rank) != (tp, rank):
                raise ValueError(f"the plan given is rank {source.rank} of tp={source.tp}, not rank {rank} of tp={tp}")
            self.plan = source
        else:
            self.manifest = source if isinstance(source, Manifest) else Manifest.from_json(source)
        self._model = self.plan.model if self.plan else self.manifest.model
        self.device = _resolve_device(device)
        self.verify = verify
        self._concurrency = concurrency
        self.retry_policy = coerce_policy(retries)
        self._connector = connector
        self._node: dict | None = None
        self._transfer: Transfer | None = None
        self.opened_s = 0.0  # seconds the store's opening and the manifest's check took (set by api.open_shard)

    def __repr__(self) -> str:  # never show credentials handed in through connector_options
        return f"ShardLoader({redact_url(self._url)!r}, model={self._model!r}, rank={self.rank}/{self.tp})"

    # ---------------------------------------------------------------- public
    @property
    def connector(self) -> Connector:
        if self._connector is None:
            self._connector = open_connector(self._url, **self._options)
        return self._connector

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's tensors (views of its arena; empty before ``load()``)."""
        return self._transfer.tensors if self._transfer else {}

    def node(self) -> dict:
        """Where this rank runs: host, Ray node id and GPU ids (when under Ray); asked once per loader."""
        if self._node is None:
            self._node = self._where()
        return self._node

    def _where(self) -> dict:
        info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": None, "gpu_ids": []}
        ray = sys.modules.get("ray")  # under Ray it is imported already; outside, importing it costs ~0.3 s
        try:
            if ray is not None and ray.is_initialized():
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
            self.plan = make_plan(
                self.manifest, self.tp, self.rank, coalesce_gap=self.connector.coalesce_gap, **self._select
            )
        return self.node()

    @bulk
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
        wrong = [r for r in self.plan.reads if self._digests.get((r.tensor, r.chunk)) != r.xxh3]
        if self.verify and wrong:
            self._digests.update(self._pull(wrong))
        t4 = time.perf_counter()
        self._phases = {"plan_s": t1 - t0, "alloc_s": t2 - t1, "pull_s": t3 - t2, "verify_s": t4 - t3}
        return self._report(started, t4 - t0, repulled=len(wrong) if self.verify else 0)

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
        return (self._transfer.done if self._transfer else 0), total

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
        """A fresh arena on the final device and the copy path for it (CPU: reads land in place; GPU: pinned
        staging ring and H2D copies)."""
        self._transfer = self.transfer_for(self.plan)
        self._digests: Digests = {}

    def transfer_for(self, plan: RankPlan) -> Transfer:
        """A fresh arena for ``plan`` (this rank's, or part of it) on the loader's device, with its copy path."""
        kind = GpuTransfer if self.device.type == "cuda" else CpuTransfer
        return kind(plan, self.device, self.connector, self.retry_policy, self.rank, self._hasher)

    def _pull(self, reads: Sequence[ChunkRead], transfer: Transfer | None = None) -> Digests:
        """Read the chunks, hash each as it completes, place it (through ``transfer``: default, the load's own).
        Returns (tensor index, chunk) -> digest."""
        transfer = transfer or self._transfer
        concurrency = max(1, self._concurrency or self.connector.default_concurrency)
        digests = transfer.pull(reads, concurrency)
        if self.verify == "full":
            tensors = self.tensors if transfer is self._transfer else None
            digests = {(r.tensor, r.chunk): self._hash(transfer.region(r, tensors)) for r in reads}
        return digests

    def _hasher(self, read: ChunkRead | None = None) -> digest.ChunkHash:
        """A fresh digest of one chunk, fed its bytes as they land (in parts when large): xxh3, and where the
        manifest also records blake3 (tamper evidence) that too, a mismatch reported as a digest that cannot equal
        the expected one. With ``verify=False`` a chunk of the plan is not hashed."""
        if read is None:
            return digest.ChunkHash()
        return digest.ChunkHash(read.xxh3, read.blake3, check=bool(self.verify))

    def _hash(self, chunk: torch.Tensor, read: ChunkRead | None = None) -> str:
        """The digest of a whole chunk (``verify="full"`` re-hashes the final tensors with it)."""
        h = self._hasher(read)
        h.update(chunk.contiguous().cpu().numpy())
        return h.hexdigest()

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
            phases=dict(getattr(self, "_phases", {})),  # plan_s, alloc_s, pull_s, verify_s of the last load
            repulled=repulled,
        )


def _resolve_device(device: str) -> torch.device:
    """The device tensors land on, with an explicit CUDA index.

    ``auto``: CUDA when this process sees a GPU, else cpu (logical Ray GPUs in tests have none). ``cuda`` (and
    ``auto`` on a GPU): the process's current device, ``torch.cuda.current_device()``: an engine's TP worker has set
    it (``torch.cuda.set_device(local_rank)``), and Ray makes a GPU actor's one GPU device 0. ``cuda:N`` as given.
    The copy threads set this index before they create streams, events and pinned buffers (transfer_gpu.py).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: got {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}, but this process sees no CUDA device; use device='cpu' or 'auto'")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r}, but this process sees {torch.cuda.device_count()} CUDA device(s) (0 to "
            f"{torch.cuda.device_count() - 1}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return torch.device("cuda", index)
