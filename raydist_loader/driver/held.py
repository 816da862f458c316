"""Layer 4 (driver): Held loads (Ray side, driver): how held actors are named, found and released.

A held load's actors live in the fixed Ray namespace :data:`NAMESPACE` under ``raydist:<model>:<rank>`` whatever
the holding driver's own namespace, so any driver or engine on the cluster finds them with
``ray.get_actor(name, namespace="raydist")``; their placement group is named ``raydist:<model>``. Replica i > 0 of
a replicated load (``replicas=R``) is ``raydist:<model>#<i>:<rank>`` and ``raydist:<model>#<i>`` (model names
cannot contain ``#``). They are
ordinary (not detached) actors owned by the holding driver: they end with it (Ctrl-C, exit, even SIGKILL) or when
:func:`release` (``raydist-loader release``) kills them from any driver.
"""

from __future__ import annotations

import time

from ..errors import RaydistError

#: the Ray namespace of every held actor
NAMESPACE = "raydist"


def actor_name(model: str, rank: int, replica: int | None = None) -> str:
    """``raydist:<model>:<rank>``: the name of a held load's actor (``raydist:<model>#<i>:<rank>`` in replica i > 0)."""
    return f"{group_name(model, replica)}:{rank}"


def group_name(model: str, replica: int | None = None) -> str:
    """``raydist:<model>``: the name of a held load's placement group (``raydist:<model>#<i>`` in replica i > 0)."""
    return f"raydist:{model}#{replica}" if replica else f"raydist:{model}"


def _model_of(group: str) -> str | None:
    """The model of a held placement group's name (an actor's without its ``:<rank>``), else None."""
    return _split(group[len("raydist:") :])[0] if group.startswith("raydist:") else None


def _split(owner: str) -> tuple[str, int]:
    """``<model>`` or ``<model>#<i>`` -> (model, replica)."""
    model, _, replica = owner.partition("#")
    return model, int(replica) if replica.isdigit() else 0


def held_names(model: str | None = None) -> list[str]:
    """Live held actors of ``model`` (every model when None), ordered by model, replica and rank."""
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != NAMESPACE or not name.startswith("raydist:"):
            continue
        owner, _, rank = name[len("raydist:") :].rpartition(":")
        if rank.isdigit() and (model is None or _split(owner)[0] == model):
            found.append((*_split(owner), int(rank), name))
    return [name for *_, name in sorted(found)]


def check_not_held(model: str) -> None:
    """One error naming the live actors when ``model`` is held already (a name can be held only once)."""
    names = held_names(model)
    if names:
        raise RaydistError(already_held(model, names))


def already_held(model: str, names: list[str]) -> str:
    import ray

    address = ray.get_runtime_context().gcs_address
    return (
        f"model {model!r} is already held by live actors {', '.join(names)} in Ray namespace {NAMESPACE!r}: use "
        f"them (ray.get_actor(name, namespace={NAMESPACE!r})) or release them first with "
        f"`raydist-loader release --model {model} --ray-address {address}` (Python: raydist_loader.release({model!r}))"
    )


def release(model: str, *, ray_address: str | None = None) -> list[str]:
    """Kill ``model``'s held actors and remove its placement group, from any driver; returns the actors' names.

    Joins the cluster as :func:`~raydist_loader.api.load_across_cluster` does, but never starts one. Raises
    :class:`RaydistError` naming the models that are held when ``model`` is not.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from .cluster import connect

    connect(ray_address, start_local=False)
    names = held_names(model)
    groups = [
        pg_id for pg_id, pg in placement_group_table().items()
        if _model_of(pg.get("name", "")) == model and pg.get("state") != "REMOVED"
    ]
    if not names and not groups:
        others = sorted({_model_of(n.rsplit(":", 1)[0]) for n in held_names()})
        raise RaydistError(
            f"nothing holds model {model!r} in Ray namespace {NAMESPACE!r} on this cluster"
            + (f"; held models: {', '.join(others)}" if others else "; no model is held")
        )
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # ended meanwhile (its holder let it go)
            pass
    for pg_id in groups:
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
        remove_placement_group(group)
        wait_removed(group)  # its resources are free when this returns
    return names


def wait_removed(pg, timeout_s: float = 10.0) -> None:
    """Wait until the placement group's resources are back, so the next load can use them at once."""
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and placement_group_table(pg).get("state") != "REMOVED":
        time.sleep(0.05)
