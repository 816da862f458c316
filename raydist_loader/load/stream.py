"""Layer 3 (load): One rank's shard streamed to an engine (below the engines: imports the worker and the transfers,
never Ray): each tensor is handed over as soon as its chunks have landed and verified, and dropped after the engine
took it; chunks whose place in the engine's parameters is known (:data:`Targets`) are read straight there.

Host memory during a streamed load does not grow with the shard: the transfers' staging (at most concurrency + 2
buffers of :data:`~raydist_loader.store.chunks.PART_BYTES`) plus one group of tensors handed over (one tensor, or
consecutive tensors of at most ``PART_BYTES`` together) in the ``global`` layout, whose pages outside the rank's
region are never touched on CPU. A chunk whose digest stays wrong after one re-pull raises
:class:`~raydist_loader.errors.VerificationError` out of :meth:`ShardStream.land` or :meth:`ShardStream.weights`,
before the engine got that tensor, naming rank, tensor and chunk; the rank digest over every chunk is checked by
:meth:`ShardStream.report` once all have landed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from ..connectors import Connector
from ..errors import VerificationError, describe_failures
from ..pool import batches
from ..report import RankReport, check_verified
from ..retry import RetryPolicy
from ..store.plan import ChunkRead, RankPlan
from .transfer import Digests, StartHash, Transfer
from .transfer_cpu import CpuTransfer
from .worker import ShardLoader

#: (tensor index in the plan, chunk id) -> where the chunk's row-major bytes go: a 1-D uint8 view (contiguous: read
#: straight into it) or a [rows, columns] uint8 block (rows as ``store.chunks.rows_of`` counts them; staged, copied)
Targets = dict[tuple[int, str], torch.Tensor]


class DirectTransfer(CpuTransfer):
    """Lands chunks in given places (views of an engine's parameters, on the host) instead of an arena of its own:
    a contiguous place is read into directly, a block is staged and copied, as column blocks are into an arena."""

    def __init__(
        self,
        plan: RankPlan,
        targets: Targets,
        connector: Connector,
        retry_policy: RetryPolicy,
        rank: int,
        start_hash: StartHash,
    ):
        self._targets = targets
        super().__init__(plan, torch.device("cpu"), connector, retry_policy, rank, start_hash)

    def _allocate(self) -> None:  # no arena: the places exist
        self._flat = []

    def _expose(self) -> None:  # nothing to view: the bytes are in the engine's tensors
        pass

    def _region(self, read: ChunkRead, tensors=None, *, flat=None) -> torch.Tensor:
        return self._targets[(read.tensor, read.chunk)]

    def _arena_run(self, read: ChunkRead) -> bool:
        return read.extract is None and self._targets[(read.tensor, read.chunk)].dim() == 1


class ShardStream:
    """A rank's shard streamed: :meth:`land` the chunks with a known place, then :meth:`weights` for the rest,
    then :meth:`report`. Wraps a :class:`~raydist_loader.load.worker.ShardLoader` (prepared here) and closes it."""

    def __init__(self, loader: ShardLoader):
        self._started, self._t0 = time.time(), time.perf_counter()
        loader.prepare()
        self.loader, self.plan = loader, loader.plan
        loader._digests = self._digests = {}  # the loader's report reads them
        self._repulled = 0
        self._phases: dict[str, float] = {"manifest_s": loader.opened_s, "land_s": 0.0, "stream_s": 0.0}

    def land(self, targets: Targets) -> None:
        """Pull the chunks named in ``targets`` straight into their places, hashed as they land, the wrong ones
        re-pulled once; raises VerificationError if one stays wrong."""
        t0 = time.perf_counter()
        reads = [r for r in self.plan.reads if (r.tensor, r.chunk) in targets]
        if reads:
            loader = self.loader
            transfer = DirectTransfer(
                self.plan, targets, loader.connector, loader.retry_policy, loader.rank, loader._hasher
            )
            self._verified(reads, transfer, None)
        self._phases["land_s"] += time.perf_counter() - t0

    def weights(self, skip: Sequence[int] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the plan but those at indices ``skip``, in plan order, as ``(name, tensor)`` in the
        loader's layout, each group pulled and verified just before it is handed over and dropped after."""
        skipped, slots = set(skip), self.plan.tensors
        reads: dict[int, list[ChunkRead]] = {}
        for r in self.plan.reads:
            reads.setdefault(r.tensor, []).append(r)
        todo = [i for i in range(len(slots)) if i not in skipped]
        size = lambda i: sum(r.nbytes for r in reads.get(i, ()))  # noqa: E731 - the rank's bytes of tensor i
        for group in batches(todo, Transfer.part_bytes, size):
            t0 = time.perf_counter()
            mini = replace(
                self.plan,
                tensors=tuple(slots[i] for i in group),
                reads=tuple(replace(r, tensor=j) for j, i in enumerate(group) for r in reads.get(i, ())),
                expected_digest="",
            )
            transfer = self.loader.transfer_for(mini)
            self._verified(mini.reads, transfer, group)
            tensors = transfer.tensors
            del transfer
            self._phases["stream_s"] += time.perf_counter() - t0
            for i in group:
                yield slots[i].name, tensors.pop(slots[i].name)

    def report(self) -> RankReport:
        """The rank's report once every chunk has landed; raises VerificationError (with ``verify``) unless the
        rank digest over all chunks equals the one the manifest gives."""
        report = self.loader._report(self._started, time.perf_counter() - self._t0, self._repulled)
        report.phases.update(self._phases)
        if self.loader.verify:
            check_verified(self.plan.model, [report])
        return report

    def close(self) -> None:
        self.loader.close()

    def _verified(self, reads: Sequence[ChunkRead], transfer: Transfer, index: Sequence[int] | None) -> None:
        """Pull ``reads`` through ``transfer``, re-pull the wrong ones once, record the digests under the plan's
        tensor indices (``index`` maps a part plan's), raise if one stays wrong."""
        loader = self.loader
        digests: Digests = loader._pull(reads, transfer)
        wrong = [r for r in reads if digests.get((r.tensor, r.chunk)) != r.xxh3]
        if loader.verify and wrong:
            digests.update(loader._pull(wrong, transfer))
            self._repulled += len(wrong)
        failures = []
        for r in reads:
            got = digests.get((r.tensor, r.chunk))
            self._digests[(r.tensor if index is None else index[r.tensor], r.chunk)] = got
            if loader.verify and got != r.xxh3:
                name = self.plan.tensors[r.tensor if index is None else index[r.tensor]].name
                failures.append({"rank": loader.rank, "tensor": name, "chunk": r.chunk, "expected": r.xxh3, "got": got})
        if failures:
            raise VerificationError(
                f"rank {loader.rank} of model {self.plan.model!r} failed verification after one re-pull: "
                f"{describe_failures(failures)}",
                failures,
            )
