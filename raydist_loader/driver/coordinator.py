"""Layer 4 (driver): Ray side of a load: placement group, one ShardLoader actor per rank, reports gathered and
verified.

One Coordinator is one TP group; with ``replicas=R`` the API makes R of them (:mod:`~raydist_loader.driver.replicas`
places them and runs their shared pull).

Tensor bytes never pass through here: actors read from the store and keep their shards; the driver sees the
manifest, the expected digests it computes itself, and the reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from ..bulk import paused_gc
from ..connectors import open_connector
from ..errors import PlacementError, RaydistError
from ..load.worker import ShardLoader
from ..options import PLACEMENTS, LoadOptions
from ..redact import redact_text, redact_url
from ..report import RankReport, check_verified
from ..store.manifest import Manifest
from ..store.plan import make_plans
from . import held


class Coordinator:
    """Starts the actors of one load, runs it, verifies it, and owns the actors until shutdown."""

    def __init__(
        self,
        manifest: Manifest,
        manifest_raw: bytes,
        url: str,
        tp: int,
        options: LoadOptions,
        connector_options: dict | None = None,
        *,
        progress: bool = False,
        hold: bool = False,
        replica: int | None = None,
        actor_class: type = ShardLoader,
        actor_kwargs: dict | None = None,
    ):
        """``hold`` names the actors ``raydist:<model>:<rank>`` in Ray namespace ``raydist`` and the placement group
        ``raydist:<model>`` (replica i > 0: ``raydist:<model>#<i>...``; see :mod:`~raydist_loader.driver.held`);
        ``progress`` shows a progress bar; ``replica`` is this TP group's index among ``options.replicas`` (None: a
        plain load); ``actor_class`` (a ShardLoader) and ``actor_kwargs`` (extra constructor arguments) say what
        each actor runs."""
        self.manifest, self.tp, self.options = manifest, tp, options
        self.replica, self._actor_class, self._actor_kwargs = replica, actor_class, actor_kwargs or {}
        self._show_progress, self.hold = progress, hold
        self._raw, self._url, self._connector_options = manifest_raw, url, connector_options or {}
        # every rank planned once, here, before any byte moves: each actor gets its own plan (it neither parses
        # the manifest nor plans), and its digest is checked against the one expected here
        with open_connector(url, **self._connector_options) as conn:
            gap = conn.coalesce_gap  # the actors' connectors are the same class, opened from the same URL
        self.plans = make_plans(manifest, tp, coalesce_gap=gap)
        self.expected = [plan.expected_digest for plan in self.plans]
        self.pg = None
        self.actors: list[Any] = []
        self.gpu = False
        self._bundles: list[int] = []
        self._cpu = options.num_cpus_per_actor
        self.marks: dict[str, float] = {}  # time.time() when a start-up phase ended: "placement", "actors"

    # ---------------------------------------------------------------- placement
    def start(self) -> None:
        """Place, start the actors and wait until they are ready."""
        self.place()
        self._ready(self.spawn())

    def bundle(self) -> dict[str, float]:
        """One rank's bundle: a GPU and a few CPUs when the cluster has a GPU for every rank of every replica."""
        import ray

        self.gpu = self._wants_gpu(ray.cluster_resources())
        cpu = self.options.num_cpus_per_actor
        return {"GPU": 1, "CPU": cpu} if self.gpu else {"CPU": cpu}

    def place(self, avoid_nodes: Collection[str] = ()) -> None:
        """Reserve one bundle per rank (a placement group); ``avoid_nodes``: Ray node ids the bundles must not use
        (replicas spread over nodes; the caller passes them only when another node has room)."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        if self.hold:
            held.check_not_held(self.manifest.model)
        bundle = self.bundle()
        selector = [{"ray.io/node-id": f"!in({','.join(sorted(avoid_nodes))})"}] * self.tp if avoid_nodes else None
        self.pg = placement_group(
            [dict(bundle) for _ in range(self.tp)],
            strategy=PLACEMENTS[self.options.placement],
            name=held.group_name(self.manifest.model, self.replica) if self.hold else "",
            bundle_label_selector=selector,
        )
        ready, _ = ray.wait([self.pg.ready()], timeout=self.options.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            self.pg = None
            raise PlacementError(
                f"{self._who()}could not place {self.tp} bundles of {bundle} with strategy "
                f"{PLACEMENTS[self.options.placement]} "
                f"within {self.options.placement_timeout_s:.0f}s; cluster has {_fmt(ray.cluster_resources())}, "
                f"available now {_fmt(ray.available_resources())}. Lower tp, use device='cpu', another placement "
                "strategy, or add nodes"
            )
        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        order = sorted(range(self.tp), key=lambda b: (nodes[b], b))  # ranks ordered by (node, bundle/GPU)
        self._bundles = order
        self.nodes = [nodes[b] for b in order]  # Ray node id of each rank
        self.marks["placement"] = time.time()

    def spawn(self) -> list:
        """Start one actor per rank in its bundle; returns the refs :meth:`_ready` waits for."""
        with paused_gc():  # each spawn pickles a plan of ~1 record per chunk
            for rank in range(self.tp):  # one by one: an interrupt in between leaves every started actor to shutdown()
                try:
                    self.actors.append(self._spawn(rank))
                except ValueError:  # a held name taken meanwhile: another driver holds the model
                    held.check_not_held(self.manifest.model)
                    raise
        return [a.prepare.remote() for a in self.actors]

    def _ready(self, refs: list) -> None:
        """Wait until every actor is up with its connector open and its plan made, so that all ranks start
        reading together (a late rank would stretch the load) and start-up stays out of the load's timing."""
        import ray

        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.options.actor_start_timeout_s)
        if pending:
            raise PlacementError(
                f"{self._who()}ranks {[refs.index(p) for p in pending]} did not start within "
                f"{self.options.actor_start_timeout_s:g}s (importing torch and opening the store); raise "
                "actor_start_timeout_s (--actor-start-timeout-s) on cold nodes"
            )
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the store could not be opened from that node
                raise RaydistError(f"{self._who(rank)}could not start: {self._clean(e)}") from None
        self.marks["actors"] = time.time()

    def _spawn(self, rank: int) -> Any:
        """Start rank's actor in its placement-group bundle (again, after the previous one died)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts = dict(
            num_cpus=self._cpu,
            num_gpus=1 if self.gpu else 0,
            max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=self._bundles[rank]
            ),
        )
        if self.hold:
            opts.update(name=held.actor_name(self.manifest.model, rank, self.replica), namespace=held.NAMESPACE)
        return (
            ray.remote(self._actor_class)
            .options(**opts)
            .remote(
                self._url,
                self.plans[rank],
                self.tp,
                rank,
                device="auto" if self.gpu else "cpu",
                concurrency=self.options.concurrency,
                verify=self.options.verify,
                connector_options=self._connector_options,
                retries=self.options.retries.policy(),
                **self._actor_kwargs,
            )
        )

    def restart_after(self, rank: int, error: BaseException, count: int) -> Any:
        """Rank's actor died (``error``): restart it for the ``count``-th time and return its load, or raise one
        clear error once ``max_restarts`` is exhausted."""
        if count > self.options.max_restarts:
            raise RaydistError(
                f"{self._who(rank)}failed: its actor died ({self._clean(error)}) after {count - 1} "
                f"restart(s); max_restarts={self.options.max_restarts} is exhausted"
            ) from None
        return self._restart(rank)

    def _restart(self, rank: int) -> Any:
        """Replace rank's dead actor with a fresh one in the same bundle and start its load again."""
        import ray

        ray.kill(self.actors[rank], no_restart=True)  # frees the bundle if it was only unreachable
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.actors[rank] = self._spawn(rank)
                break
            except ValueError:  # a named actor's name is freed a moment after it dies
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self.actors[rank].load.remote()

    def _wants_gpu(self, resources: dict) -> bool:
        if self.options.device == "cpu":
            return False
        need = self.tp * self.options.replicas  # every replica's ranks get GPUs, or none does
        has = resources.get("GPU", 0) >= need
        if self.options.device == "cuda" and not has:
            raise PlacementError(f"device='cuda' needs {need} GPUs; the cluster has {resources.get('GPU', 0):g}")
        return has

    # ---------------------------------------------------------------- load + verify
    def load(self) -> list[RankReport]:
        """Every rank pulls (and re-pulls once what failed) its shard; returns the reports in rank order, each
        rank's digest checked against the one computed here from the manifest."""
        refs = [a.load.remote() for a in self.actors]
        stop = threading.Event()
        watcher = self._progress(stop) if self._show_progress else None
        try:
            reports = self._gather(refs)
        finally:
            stop.set()
            if watcher:
                watcher.join()
        if self.options.verify:  # each actor re-pulled its wrong chunks once; check its digest against ours
            check_verified(self.manifest.model, reports, self.expected)
        return reports

    def _gather(self, refs: list, restarts: list[int] | None = None) -> list[RankReport]:
        """Wait for every rank; a rank whose actor died is restarted (``max_restarts`` times in all, counting
        ``restarts`` already made), any other failure raises at once naming the rank. Never returns with a rank
        missing."""
        import ray
        from ray.exceptions import RayActorError

        refs = list(refs)
        restarts = list(restarts or [0] * len(refs))
        deadline = time.monotonic() + self.options.timeout_s
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done and time.monotonic() >= deadline:
                ranks = [refs.index(p) for p in pending]
                raise RaydistError(
                    f"{self._who()}load did not finish within {self.options.timeout_s:.0f}s; ranks {ranks} pending"
                )
            for ref in done:
                rank = refs.index(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    restarts[rank] += 1
                    refs[rank] = self.restart_after(rank, e, restarts[rank])
                    pending.append(refs[rank])
                except Exception as e:  # noqa: BLE001 - surface the first failing rank with its cause
                    raise RaydistError(f"{self._who(rank)}failed: {self._clean(e)}") from None
        reports = ray.get(refs)
        for report in reports:
            report.restarts = restarts[report.rank]
        return reports

    def _progress(self, stop: threading.Event, actors: list | None = None) -> threading.Thread:
        """A thread showing the bytes landed on ``actors`` (default: this group's) until ``stop``."""
        from .progress import show

        def poll() -> list[tuple[int, int]]:
            import ray

            return ray.get([a.progress.remote() for a in actors or self.actors])

        thread = threading.Thread(target=show, args=(poll, stop), daemon=True)
        thread.start()
        return thread

    def _who(self, rank: int | None = None) -> str:
        """The prefix of this group's messages: ``"rank 1 "``, ``"replica 0 rank 1 "``, ``"replica 0: "`` or ``""``."""
        replica = "" if self.replica is None else f"replica {self.replica}"
        if rank is None:
            return f"{replica}: " if replica else ""
        return f"{replica} rank {rank} ".lstrip()

    def _clean(self, exc: BaseException) -> str:
        text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
        line = next((t for t in reversed(text) if t.strip()), type(exc).__name__)
        return redact_text(
            line, secrets=tuple(v for k, v in self._connector_options.items() if "password" in k and isinstance(v, str))
        )

    # ---------------------------------------------------------------- after the load
    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        import ray

        return ray.get([a.run.remote(fn, *args) for a in self.actors])

    def call(self, rank: int, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.actors[rank], method).remote(*args))

    def alive(self, timeout_s: float = 10.0) -> bool:
        """Whether every actor still answers (a held load's actors can be released by another driver)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            ray.get([a.progress.remote() for a in self.actors], timeout=timeout_s)
        except RayActorError:
            return False
        except GetTimeoutError:  # busy serving an engine's calls: alive
            pass
        return bool(self.actors)

    def names(self) -> list[str]:
        """The actors' names when held (``raydist:<model>:<rank>``, namespace ``raydist``), else []."""
        return [held.actor_name(self.manifest.model, r, self.replica) for r in range(self.tp)] if self.hold else []

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            held.wait_removed(self.pg)
            self.pg = None

    def __repr__(self) -> str:
        return f"Coordinator({redact_url(self._url)!r}, model={self.manifest.model!r}, tp={self.tp})"


def _fmt(resources: dict) -> str:
    keys = ("CPU", "GPU", "memory")
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys if k in resources and k != "memory") + "}"
