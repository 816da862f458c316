"""Layer 5 (entry points): The Python API: ``load_across_cluster`` (Ray, one actor per rank) and ``load_shard`` (inside
an engine's worker)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bulk import bulk
from .connectors import Connector, check_url, open_connector
from .driver.coordinator import Coordinator
from .driver.held import NAMESPACE
from .driver.interrupt import InterruptGuard
from .driver.replicas import load_groups, make_groups, run_groups, start_groups
from .errors import ConfigError
from .load.worker import ShardLoader
from .options import DEFAULTS, Device, Placement, Verify, load_options
from .report import LoadReport, PhaseClock, RankReport, check_verified
from .retry import RetryPolicy
from .store.experts import Experts
from .store.leases import Lease
from .store.manifest import Manifest, check_stored
from .store.plan import Layout
from .store.rules import RuleSet
from .store.verify import check_manifest_sha256, check_pin
from .store.versions import VersionRef, read_manifest_bytes, resolve


class Replica:
    """One TP group of a load (``LoadedModel.replica(i)``): its ranks' shards live in its actors."""

    def __init__(self, coordinator: Coordinator):
        self._coordinator = coordinator

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(rank, tensors, *args)`` on every rank of this replica, next to its shard; results in rank order."""
        return self._coordinator.run(fn, *args)

    def state_dict(self, rank: int) -> dict[str, torch.Tensor]:
        """CPU copies of one rank's tensors (tests and tools: this copies through the object store)."""
        return self._coordinator.call(rank, "state_dict")

    def metadata(self, rank: int) -> dict[str, dict]:
        """Per tensor: global shape, split dim, segment ranges, kv replicas, padded vocab."""
        return self._coordinator.call(rank, "metadata")


class LoadedModel:
    """A verified load: every rank's shard lives in its actor, in each replica. Use ``run`` to hand the shards to
    an engine; ``replica(i)`` for one TP group; ``state_dict``/``metadata`` are replica 0's."""

    def __init__(self, coordinators: Coordinator | list[Coordinator], report: LoadReport):
        self._groups = coordinators if isinstance(coordinators, list) else [coordinators]
        self.report = report
        self.model, self.tp, self.replicas = report.model, report.tp, len(self._groups)

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(rank, tensors, *args)`` on every actor, next to its shard; results ordered by replica, then rank."""
        return run_groups(self._groups, fn, *args)

    def replica(self, index: int) -> Replica:
        """Replica ``index`` (0 <= index < replicas): its own ``run``, ``state_dict`` and ``metadata``."""
        if not 0 <= index < self.replicas:
            raise IndexError(f"replica {index} is outside replicas={self.replicas} (0..{self.replicas - 1})")
        return Replica(self._groups[index])

    def state_dict(self, rank: int) -> dict[str, torch.Tensor]:
        """CPU copies of one rank's tensors of replica 0 (tests and tools: this copies through the object store)."""
        return self.replica(0).state_dict(rank)

    def metadata(self, rank: int) -> dict[str, dict]:
        """Per tensor: global shape, split dim, segment ranges, kv replicas, padded vocab (the same in every
        replica)."""
        return self.replica(0).metadata(rank)

    @property
    def names(self) -> list[str]:
        """The actors' names in Ray namespace :attr:`namespace` when loaded with ``hold=True`` (ordered by replica,
        then rank), else []: another driver gets one with ``ray.get_actor(name, namespace="raydist")``."""
        return [name for group in self._groups for name in group.names()]

    namespace = NAMESPACE

    @property
    def ray_address(self) -> str:
        """The cluster's address (GCS), for another driver's ``ray.init(address=...)``."""
        import ray

        return ray.get_runtime_context().gcs_address

    def hold(self, poll_s: float = 1.0) -> bool:
        """Block while the actors serve other drivers: until Ctrl-C (returns False) or until they are released from
        elsewhere (``raydist-loader release``; returns True). The actors are owned by this process either way: they
        end when it ends. Call :meth:`shutdown` afterwards (the context manager does)."""
        try:
            while all(group.alive() for group in self._groups):
                time.sleep(poll_s)
        except KeyboardInterrupt:
            return False
        return True

    lease: Lease | None = None  # this load's claim on its version (gc keeps it), released at shutdown

    @property
    def version(self) -> str:
        """The version every rank of every replica loaded (one, always)."""
        return self.report.version

    def shutdown(self) -> None:
        """End every actor and remove every placement group; release the lease on the version."""
        try:
            for group in self._groups:
                group.shutdown()
        finally:
            if self.lease is not None:
                self.lease.release()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        total = self.report.total
        replicas = f", replicas={self.replicas}" if self.replicas > 1 else ""
        return (
            f"LoadedModel({self.model!r}, tp={self.tp}{replicas}, {total.bytes / 1e9:.2f} GB, "
            f"{total.gbps:.2f} GB/s, verified={self.report.verified})"
        )


def open_manifest(
    url: str,
    model: str,
    *,
    model_version: str | None = None,
    expect_manifest_sha256: str | None = None,
    rules: str | Path | dict | None = None,
    connector_options: dict | None = None,
    manifest_sha256: str | None = None,
) -> tuple[Manifest, bytes]:
    """Read the manifest of one version once (``model_version``, else the current one: the whole load then reads
    only that version) and check what the caller pinned. ``manifest_sha256``: what the stored manifest's sha256
    must be (an engine's ranks check the one their rank 0 resolved)."""
    with open_connector(url, **(connector_options or {})) as conn:
        return checked_manifest(conn, model, model_version=model_version, manifest_sha256=manifest_sha256,
                                expect_manifest_sha256=expect_manifest_sha256, rules=rules)


def resolve_version(
    url: str, model: str, *, model_version: str | None = None, connector_options: dict | None = None
) -> VersionRef:
    """The version a load would read now (``model_version`` when pinned: it must exist; else the current one) and
    its manifest's sha256, from the current pointer alone: what an engine's rank 0 hands to every rank."""
    with open_connector(url, **(connector_options or {})) as conn:
        return resolve(conn, model, model_version)


def checked_manifest(
    conn: Connector,
    model: str,
    *,
    model_version: str | None = None,
    manifest_sha256: str | None = None,
    expect_manifest_sha256: str | None = None,
    rules: str | Path | dict | None = None,
) -> tuple[Manifest, bytes]:
    """:func:`open_manifest` through a connector the caller keeps open (``load_shard`` then loads through it)."""
    # validates, and explains a missing model or version
    manifest, raw = read_manifest_bytes(conn, model, model_version, manifest_sha256=manifest_sha256)
    check_manifest_sha256(raw, expect_manifest_sha256, f"{conn.describe()} {model}/{manifest.version}/manifest.json")
    check_stored(conn, manifest)  # nothing is allocated for spans the store does not hold
    if rules is not None:
        wanted = RuleSet.for_checkpoint(manifest.config, rules).fingerprint()
        if wanted != manifest.rules_fingerprint:
            raise ConfigError(
                f"the rules given differ from those model {model!r} was published with: re-publish "
                "(`raydist-loader publish ... --rules FILE`) or re-index with these rules, or load without rules="
            )
    return manifest, raw


def load_across_cluster(
    model: str,
    url: str,
    tp: int = 8,
    *,
    device: Device = DEFAULTS.device,
    placement: Placement = DEFAULTS.placement,
    replicas: int = DEFAULTS.replicas,
    concurrency: int | None = DEFAULTS.concurrency,
    verify: Verify = DEFAULTS.verify,
    rules: str | Path | dict | None = None,
    ray_address: str | None = None,
    timeout_s: float = DEFAULTS.timeout_s,
    placement_timeout_s: float = DEFAULTS.placement_timeout_s,
    actor_start_timeout_s: float = DEFAULTS.actor_start_timeout_s,
    expect_manifest_sha256: str | None = None,
    connector_options: dict | None = None,
    num_cpus_per_actor: float = DEFAULTS.num_cpus_per_actor,
    progress: bool | None = None,
    hold: bool = False,
    retries: RetryPolicy | dict | None = None,
    max_restarts: int = DEFAULTS.max_restarts,
    model_version: str | None = DEFAULTS.model_version,
) -> LoadedModel:
    """Load ``model`` from store ``url`` across ``tp`` Ray actors (one per GPU), verified before it returns.

    ``replicas=R`` loads R data-parallel copies of the TP group (R x tp actors, one placement group per copy,
    spread over nodes while they fit) and reads the store once: each chunk is read by one copy and reaches the
    others' same rank through Ray's object store, where it is verified again
    (see :mod:`raydist_loader.driver.replicas`).

    Each actor pulls only its TP shard; a digest mismatch re-pulls those chunks once and then raises
    :class:`VerificationError` naming rank, tensor and chunk, so a LoadedModel is never returned unverified
    (unless ``verify=False``). ``device="auto"`` uses GPU bundles when the cluster has ``tp`` GPUs. Transient
    backend errors are retried per ``retries`` (a RetryPolicy or dict: attempts, base_delay_s, max_delay_s,
    deadline_s; None: the defaults); an actor that dies mid-load is restarted in its bundle up to ``max_restarts``
    times. ``model_version`` loads that version, current or not (default: the current one). The manifest is read
    once, here: every rank of every replica loads the one version it names, whatever is published meanwhile, and
    the load holds a lease on it (gc keeps it) until :meth:`LoadedModel.shutdown`. Every option, its default and
    its bounds: :class:`~raydist_loader.options.LoadOptions`.
    """
    from .driver.cluster import connect

    check_url(url)  # a bad URL, a malformed pin: refused before Ray starts or a byte is read
    expect_manifest_sha256 = check_pin(expect_manifest_sha256)
    options = load_options(
        dict(
            device=device,
            placement=placement,
            replicas=replicas,
            concurrency=concurrency,
            verify=verify,
            num_cpus_per_actor=num_cpus_per_actor,
            timeout_s=timeout_s,
            placement_timeout_s=placement_timeout_s,
            actor_start_timeout_s=actor_start_timeout_s,
            max_restarts=max_restarts,
            retries=retries,
            model_version=model_version,
        )
    )
    clock = PhaseClock()
    # the manifest first: a wrong URL, model or tp is refused before any Ray starts; a pinned version is leased
    # before it is looked up (gc cannot take it meanwhile), the current one as soon as it is known
    holder = f"ray load tp={tp} replicas={replicas}"
    lease = None
    if options.model_version:
        lease = Lease.try_take(url, model, options.model_version, holder, connector_options=connector_options)
    try:
        manifest, raw = open_manifest(
            url, model, model_version=options.model_version, expect_manifest_sha256=expect_manifest_sha256,
            rules=rules, connector_options=connector_options,
        )
        manifest.check_tp(tp)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    lease = lease or Lease.try_take(url, model, manifest.version, holder, connector_options=connector_options)

    def plan() -> list[Coordinator]:
        """One coordinator per replica; each computes its ranks' plans and expected digests (the rest of the
        manifest phase)."""
        groups = make_groups(
            manifest, raw, url, tp, options, connector_options,
            progress=sys.stderr.isatty() if progress is None else progress, hold=hold,
        )
        clock.span("manifest", 0.0, clock.now())
        return groups

    try:
        with InterruptGuard() as interrupts:  # Ctrl-C stops the load at any point, and nothing is left running
            with ThreadPoolExecutor(1, thread_name_prefix="plan") as pool:  # planned while Ray connects
                planned = pool.submit(plan)
                with clock.phase("connect"):
                    connect(ray_address)
                groups = planned.result()
            try:
                started = clock.now()
                start_groups(groups)
                ready = clock.now()
                reports = load_groups(groups)
                interrupts.check()
                placed = clock.since(max(group.marks["placement"] for group in groups))
                clock.span("placement", started, placed)
                clock.span("actors", placed, ready)
                pulls = (r.started + sum(r.phases.get(k, 0.0) for k in ("plan_s", "alloc_s", "pull_s"))
                         for r in reports)
                clock.span("pull", ready, max(ready, clock.since(max(pulls))))
                clock.span("verify", clock.spans["pull"][1], clock.now())  # rank compares, re-pulls, digest check
                loaded = LoadedModel(groups, LoadReport.gather(reports, ready, bool(verify), clock.phases()))
                loaded.lease = lease
                return loaded
            except BaseException:  # nothing may outlive a failed call: whatever raised, the actors go
                with interrupts.shielded():
                    for group in groups:
                        group.shutdown()
                raise
    except BaseException:
        if lease is not None:
            lease.release()
        raise


@dataclass
class Shard:
    """One rank's shard loaded in this process: tensors, their metadata and the report."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, dict]
    report: RankReport


def open_shard(
    model: str,
    url: str,
    tp: int,
    rank: int,
    *,
    device: str = DEFAULTS.device,
    concurrency: int | None = DEFAULTS.concurrency,
    verify: Verify = DEFAULTS.verify,
    expect_manifest_sha256: str | None = None,
    connector_options: dict | None = None,
    retries: RetryPolicy | dict | None = None,
    only: Callable[[str], bool] | None = None,
    layout: Layout = "rank",
    experts: Experts | None = None,
    model_version: str | None = DEFAULTS.model_version,
    manifest_sha256: str | None = None,
) -> ShardLoader:
    """One rank's loader, its store opened and the manifest read and checked once (``loader.opened_s`` says how
    long that took), not loaded yet: :func:`load_shard` loads it whole, an engine hand-off streams it
    (:mod:`raydist_loader.load.stream`). The caller closes it. Options as in :func:`load_shard`."""
    options = load_options(dict(concurrency=concurrency, verify=verify, retries=retries, model_version=model_version))
    expect_manifest_sha256 = check_pin(expect_manifest_sha256)
    t0 = time.perf_counter()
    conn = open_connector(url, **(connector_options or {}))  # one connection set-up for manifest and shard
    try:
        manifest, _ = checked_manifest(  # parsed and checked once; the loader plans this rank from it
            conn, model, model_version=options.model_version, manifest_sha256=manifest_sha256,
            expect_manifest_sha256=expect_manifest_sha256,
        )
        loader = ShardLoader(
            url, manifest, tp, rank, device=device, concurrency=options.concurrency, verify=options.verify,
            connector_options=connector_options, retries=options.retries.policy(), only=only, layout=layout,
            connector=conn, experts=experts,
        )
    except BaseException:
        conn.close()
        raise
    loader.opened_s = time.perf_counter() - t0
    return loader


@bulk
def load_shard(
    model: str,
    url: str,
    tp: int,
    rank: int,
    *,
    device: str = DEFAULTS.device,
    concurrency: int | None = DEFAULTS.concurrency,
    verify: Verify = DEFAULTS.verify,
    expect_manifest_sha256: str | None = None,
    connector_options: dict | None = None,
    retries: RetryPolicy | dict | None = None,
    only: Callable[[str], bool] | None = None,
    layout: Layout = "rank",
    experts: Experts | None = None,
    model_version: str | None = DEFAULTS.model_version,
    manifest_sha256: str | None = None,
) -> Shard:
    """Load one rank's shard inside the calling process (an engine's own TP worker; no Ray needed).

    Verifies its own digests, re-pulls wrong chunks once, and raises VerificationError if they stay wrong.
    ``device``: ``cuda`` is this process's current GPU (``torch.cuda.current_device()``, which an engine's TP worker
    has set), ``cuda:N`` that GPU, ``auto`` the current GPU when there is one, else ``cpu``; the other options as in
    :class:`~raydist_loader.options.LoadOptions`. ``verify=True`` checks the bytes as read from the store (hashed on
    the host before the copy to the GPU); ``verify="full"`` also re-hashes the tensors where they ended up.
    ``only(name)`` keeps a subset of the tensors (a pipeline stage's); ``layout="global"`` lands each tensor's bytes
    in its region of a full-size tensor (engine weight loaders that narrow by rank; see
    :data:`~raydist_loader.store.plan.Layout`); ``experts(name, expert)`` turns on expert parallelism: the routed
    experts it holds are pulled whole, the others not at all (see :mod:`~raydist_loader.store.experts`).
    ``model_version`` loads that version, current or not (default: the current one); ``manifest_sha256`` is the
    sha256 its stored manifest must have (:func:`resolve_version` gives both: what an engine's rank 0 hands to its
    other ranks, so that every rank loads one version).
    """
    loader = open_shard(
        model, url, tp, rank, device=device, concurrency=concurrency, verify=verify,
        expect_manifest_sha256=expect_manifest_sha256, connector_options=connector_options, retries=retries,
        only=only, layout=layout, experts=experts, model_version=model_version, manifest_sha256=manifest_sha256,
    )
    try:
        report = loader.load()
        report.phases["manifest_s"] = loader.opened_s  # the store opened, the manifest read and validated
        if verify:
            check_verified(model, [report])
        return Shard(loader.tensors, loader.metadata(), report)
    finally:
        loader.close()
