"""Layer 2 (store commands): ``gc`` and ``versions``: every version a store holds for a model, what gc does with
each, and the deletion itself.

Only prefixes that look like our version ids (``vYYYYmmddHHMMSSmmm-xxxxxxxx``) are ever touched, so original
checkpoint files indexed in place, leases and anything else an operator keeps under the model's name are left
alone. A version is kept when it is current; when a live lease names it (a loading or serving engine, a held Ray load:
:mod:`.leases`); when it is among the ``keep`` most recently current ones; when the current version names its
objects, or a kept version is built on it (its chain: RL updates, :mod:`.updates`); or while a publish of several
parts writing it is open (before its deadline, :mod:`.memory`).
Otherwise the grace period never counts from a version id (stamped when its publish *started*, possibly hours
before its swap):

* a version that was current is deleted ``grace_s`` after it last stopped being current, as recorded by the swap
  that replaced it (``retired`` in the current pointer): a reader that resolved it just before the swap can finish;
* any other version (a publish that died, one still writing, one that lost a publish race, or one whose record
  is lost) is deleted once nothing has written to it for ``grace_s`` AND the current version has been current for
  ``grace_s`` (it may have been current until then). A version whose objects the store cannot date (a Redis with
  an LFU policy) is kept.

A version's manifest is deleted first, so a version half deleted is never listed (or promoted) as complete. Times
come from the clocks of the publishing host (``retired``), of the lease holders, and of the store (write times).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from ..connectors import Connector, open_connector
from ..errors import ManifestError, NotFoundError, RaydistError
from . import versions as vs
from .leases import LeaseInfo, drop_expired, read_leases, stamp
from .manifest import VERSION_RE, Manifest, check_model_name, manifest_key

DEFAULT_GRACE_S = 3600.0


@dataclass
class VersionState:
    """One version as the store holds it, and what gc does with it (``versions`` prints these)."""

    version: str
    current: bool
    complete: bool  # its manifest is there and every object it names
    published_at: float | None  # from its manifest (None: no manifest: a publish that died or is writing)
    bytes: int | None
    tensors: int | None
    layout: str | None
    retired_at: float | None  # when it last stopped being current (None: current, or never was)
    objects: int  # objects under its prefix
    leases: list[dict] = field(default_factory=list)  # live leases: holder, host, pid, started, expires
    kept: str | None = None  # why gc keeps it (None: gc may delete it from ``gc_after`` on)
    gc_after: float | None = None  # when gc (at the grace it was asked with) may delete it
    built_on: list[str] = field(default_factory=list)  # the earlier versions it names objects of (its chain)

    def to_dict(self) -> dict:
        return asdict(self)


def survey(conn: Connector, model: str, *, grace_s: float = DEFAULT_GRACE_S, keep: int = 0,
           now: float | None = None) -> tuple[vs.Current, list[VersionState], dict[str, list[str]]]:
    """Every version of ``model`` in the store (newest first), with gc's decision at ``grace_s`` / ``keep``, and
    each version's keys."""
    check_model_name(model)
    now = time.time() if now is None else now
    cur = vs.read_current(conn, model)
    try:
        current_manifest = vs.read_manifest(conn, model)
    except NotFoundError:  # the current version's manifest is gone (a promote that raced a gc): list, keep all
        current_manifest = None
    keys: dict[str, list[str]] = {}
    listed: set[str] = set()
    for key in conn.list(f"{model}/"):
        listed.add(key)
        head = key[len(model) + 1:].split("/", 1)[0]
        if VERSION_RE.match(head) and key != manifest_key(model):
            keys.setdefault(head, []).append(key)
    keys.setdefault(cur.version, [])
    leases = {v: [x for x in ls if x.live(now)] for v, ls in read_leases(conn, model).items()}
    named = current_manifest.all_objects() if current_manifest is not None else set()
    in_use = {key.split("/")[len(model.split("/"))] for key in named}
    recent = sorted(cur.retired, key=cur.retired.get, reverse=True)[:keep]
    built_on: dict[str, str] = {}  # version -> a kept version built on it (its chain: deltas, unchanged chunks)
    states = []
    for version in sorted(keys, reverse=True):
        manifest = current_manifest if version == cur.version else _manifest(conn, model, version, keys[version])
        complete = manifest is not None and manifest.all_objects() <= listed
        state = VersionState(
            version, version == cur.version, complete,
            manifest.created if manifest else None, manifest.total_bytes if manifest else None,
            len(manifest.tensors) if manifest else None, manifest.layout if manifest else None,
            cur.retired.get(version), len(keys[version]),
            [_lease_dict(x) for x in leases.get(version, [])],
            built_on=list(manifest.chain or ()) if manifest else [],
        )
        if state.current:
            state.kept = "current" if manifest is not None else "current, but its manifest is MISSING"
        elif state.leases:
            state.kept = "leased: " + "; ".join(x.describe() for x in leases[version])
        elif version in recent:
            state.kept = f"one of the {keep} most recently current (--keep {keep})"
        elif version in in_use:
            state.kept = "the current version names its objects"
        elif version in built_on:
            state.kept = f"version {built_on[version]} (kept) is built on it: it names its objects"
        elif (until := _open_until(conn, model, version, keys[version])) is not None and until > now:
            state.kept = f"a publish of several parts (open_version) is open until {stamp(until)}"
        else:
            quiet = _unused_since(conn, cur, version, keys[version])
            if quiet is None:
                state.kept = "its objects cannot be dated by this store"
            else:
                state.gc_after = quiet + grace_s
        stays = state.kept is not None or state.gc_after is None or state.gc_after > now
        if stays and manifest is not None:  # what it is built on is older: decided after it
            for base in manifest.chain or ():
                built_on.setdefault(base, version)
        states.append(state)
    return cur, states, keys


def _open_until(conn: Connector, model: str, version: str, keys: list[str]) -> float | None:
    """The deadline of a publish from memory in several parts still writing ``version`` (``parts/open.json``,
    :mod:`.memory`); None when it is not one or the record cannot be read."""
    key = f"{model}/{version}/parts/open.json"
    if key not in keys or vs.version_manifest_key(model, version) in keys:
        return None
    try:
        return float(json.loads(conn.read(key))["token"]["deadline"])
    except (RaydistError, ValueError, KeyError, TypeError):
        return None


def _manifest(conn: Connector, model: str, version: str, keys: list[str]) -> Manifest | None:
    if vs.version_manifest_key(model, version) not in keys:
        return None
    try:
        return vs.read_manifest(conn, model, version)
    except (RaydistError, ManifestError):
        return None  # damaged: listed as incomplete


def _lease_dict(x: LeaseInfo) -> dict:
    return {"holder": x.holder, "host": x.host, "pid": x.pid, "started": x.started, "expires": x.expires}


def _unused_since(conn: Connector, cur: vs.Current, version: str, keys: list[str]) -> float | None:
    """Since when nothing can use ``version`` (seconds since the epoch), or None when that cannot be told."""
    retired = cur.retired.get(version)
    if retired is not None:
        return retired
    written = [t for t in conn.modified(keys) if t is not None]
    return max(max(written), cur.since) if written else None


def versions(url: str, model: str, *, grace_s: float = DEFAULT_GRACE_S, keep: int = 0,
             connector_options: dict | None = None) -> list[dict]:
    """Every version of ``model`` in the store, newest first: ``version``, ``current``, ``published_at``, ``bytes``,
    ``complete``, ``retired_at``, ``leases`` (who holds it), ``kept`` (why gc keeps it) or ``gc_after`` (when gc at
    ``grace_s`` may delete it)."""
    with open_connector(url, **(connector_options or {})) as conn:
        return [s.to_dict() for s in survey(conn, model, grace_s=grace_s, keep=keep)[1]]


def gc(
    url: str,
    model: str,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    keep: int = 0,
    dry_run: bool = False,
    connector_options: dict | None = None,
) -> dict:
    """Delete the versions gc may delete now (see the module). Returns ``{"current": version, "deleted":
    [prefix...], "kept": [prefix...], "reasons": {prefix: why kept}, "objects": n, "dry_run": bool}``."""
    with open_connector(url, **(connector_options or {})) as conn:
        cur, states, keys = survey(conn, model, grace_s=grace_s, keep=keep)
        if any(s.current and not s.complete for s in states):
            raise NotFoundError(
                f"the current version {cur.version} of {model!r} in {conn.describe()} is incomplete (its manifest or "
                "objects are missing): gc deletes nothing until a complete version is current (`raydist-loader "
                "versions` lists them, `raydist-loader promote` makes one current)"
            )
        now = time.time()
        deleted, kept, reasons, n = [], [], {}, 0
        built_on: dict[str, str] = {}  # a version found kept while gc ran protects its chain (newest go first)
        for state in sorted(states, key=lambda s: s.version, reverse=True):
            prefix = f"{model}/{state.version}/"
            why = state.kept
            if why is None and state.version in built_on:
                why = f"version {built_on[state.version]} (kept) is built on it: it names its objects"
            if why is None and (state.gc_after is None or now < state.gc_after):
                why = "within its grace period"
            if why is None and not dry_run:
                why = _delete_version(conn, model, state.version, keys[state.version])
            if why is not None:
                kept.append(prefix)
                reasons[prefix] = why
                for base in state.built_on:
                    built_on.setdefault(base, state.version)
                continue
            deleted.append(prefix)
            n += 0 if dry_run else len(keys[state.version])
        if not dry_run:
            drop_expired(conn, model, older_than_s=grace_s)
    return {"current": cur.version, "deleted": deleted, "kept": kept, "reasons": reasons, "objects": n,
            "dry_run": dry_run}


def _claimed(conn: Connector, model: str, version: str) -> str | None:
    """Why ``version`` may not go after all, looked at again just before it is deleted: it became current (a
    promote), the current version or a version leased now is built on it, or a lease names it now (a load that
    started after the survey)."""
    cur = vs.read_current(conn, model)
    if cur.version == version:
        return "became current while gc ran (a promote)"
    try:
        if version in (vs.read_manifest(conn, model, cur.version).chain or ()):
            return f"the current version {cur.version} is built on it (published while gc ran)"
    except (RaydistError, ManifestError):
        pass  # the current version's own state is the survey's concern
    leases = {v: [x for x in ls if x.live()] for v, ls in read_leases(conn, model).items()}
    live = leases.get(version, [])
    if live:
        return "leased: " + "; ".join(x.describe() for x in live)
    for other in (v for v, ls in leases.items() if ls and v != version):  # a version leased now, built on it
        try:
            if version in (vs.read_manifest(conn, model, other).chain or ()):
                return f"version {other} (leased now) is built on it"
        except (RaydistError, ManifestError):
            continue
    return None


def _delete_version(conn: Connector, model: str, version: str, keys: list[str]) -> str | None:
    """Delete ``version`` (its manifest first, so a version half deleted is never listed or promoted as complete),
    unless it is claimed just before, or just after its manifest went (then the manifest is put back and the
    reason returned). None: deleted."""
    why = _claimed(conn, model, version)
    if why is not None:
        return why
    first = vs.version_manifest_key(model, version)
    saved = conn.read(first) if first in keys else None
    if saved is not None:
        conn.delete(first)
        why = _claimed(conn, model, version)
        if why is not None:
            conn.write(first, saved)
            return why
    for key in keys:
        if key != first:
            conn.delete(key)
    return None
