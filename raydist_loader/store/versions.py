"""Layer 2 (store): Versions of a model: each version's immutable manifest, the small pointer that makes one current,
and the verbs on them (resolve, read a named version, swap, promote).

Layout (``raydist-loader/2`` manifests, one per version)::

    <model>/manifest.json            the current pointer: {"format": "raydist-loader/current/1", "version": V,
                                     "manifest_sha256": sha256 of V's stored manifest, "since": t, "retired": {...}}
    <model>/<version>/manifest.json  the version's manifest, written once before the pointer names it, never changed
    <model>/<version>/...            the version's objects

Only the pointer changes, always by compare-and-swap (publish, index and promote alike), so a reader that resolved a
version reads that version's own manifest and nothing a later publish writes can reach it. An engine of several
ranks resolves the version once and hands ``(version, manifest_sha256)`` to every rank (:mod:`raydist_loader.engines.
handoff`): every rank then reads the very same manifest bytes.

A store written before versions existed (``<model>/manifest.json`` is the manifest itself) keeps loading as one
version; the next publish, index or promote writes that manifest to ``<model>/<version>/manifest.json`` first, then
swaps in a pointer.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..connectors import Connector
from ..errors import ConflictError, ManifestError, NotFoundError, RaydistError, VerificationError
from . import manifest as mf
from .leases import brief_lease

POINTER_FORMAT = "raydist-loader/current/1"
#: retired versions the pointer remembers (gc's grace and ``--keep`` read them; older ones count as never current)
MAX_RETIRED = 256
_POINTER_BYTES = 1 << 20  # a pointer is ~100 bytes per retired version: anything larger is a manifest


class Pointer(BaseModel):
    """The current pointer, ``<model>/manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["raydist-loader/current/1"]
    version: str = Field(pattern=mf.VERSION_RE.pattern)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    since: float  # when this version became current (publish or promote; the writer's clock)
    #: earlier versions -> when each last stopped being current; ``gc`` counts its grace from it
    retired: dict[str, float] = Field(default_factory=dict)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def version_manifest_key(model: str, version: str) -> str:
    """Where version ``version`` of ``model`` keeps its own manifest."""
    return f"{mf.version_prefix(mf.check_model_name(model), version)}manifest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Current:
    """What ``<model>/manifest.json`` says now: the current version, its manifest's sha256, since when, the
    retired versions; ``stored`` is the object's exact bytes (what a swap compares against). ``legacy`` holds the
    manifest itself for a store written before versions (its manifest is the current object)."""

    version: str
    manifest_sha256: str
    since: float
    retired: dict[str, float]
    stored: bytes
    legacy: bytes | None = None


def is_pointer(data: bytes) -> bool:
    return len(data) < _POINTER_BYTES and POINTER_FORMAT.encode() in data[:80]


def parse_current(stored: bytes, where: str) -> Current:
    """``<model>/manifest.json``'s bytes as a :class:`Current` (a pointer, or a manifest of the older layout)."""
    if is_pointer(stored):
        try:
            p = Pointer.model_validate_json(stored)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ManifestError(f"{where}: the current pointer is damaged: field {loc}: {err['msg']}; promote a "
                                "version (`raydist-loader promote`) or re-publish the model") from None
        return Current(p.version, p.manifest_sha256, p.since, dict(p.retired), stored)
    m = mf.Manifest.from_json(stored, where=where)
    return Current(m.version, sha256(stored), m.created, dict(m.retired or {}), stored, legacy=stored)


def read_current(conn: Connector, model: str) -> Current:
    """The model's current version; a model with none says how to publish or index it."""
    key = mf.manifest_key(model)
    try:
        stored = conn.read(key)
    except NotFoundError:
        raise NotFoundError(mf.missing_message(conn, model)) from None
    return parse_current(stored, f"{conn.describe()} {key}")


def current_or_none(conn: Connector, model: str) -> Current | None:
    """:func:`read_current`, or None when the model has no current version or its pointer cannot be read."""
    try:
        return read_current(conn, model)
    except (NotFoundError, ManifestError):
        return None


@dataclass(frozen=True)
class VersionRef:
    """A resolved version: its id and the sha256 of its stored manifest (what every rank of an engine checks)."""

    version: str
    manifest_sha256: str


def resolve(conn: Connector, model: str, version: str | None = None) -> VersionRef:
    """The version a load of ``model`` reads: ``version`` when pinned (it must exist), else the current one.
    Cheap: the pointer alone names the current version; a pinned one reads its manifest's bytes (unparsed)."""
    if version is None:
        cur = read_current(conn, model)
        return VersionRef(cur.version, cur.manifest_sha256)
    return VersionRef(version, sha256(_stored_version(conn, model, version)))


def check_version_id(version: str, where: str = "model_version") -> str:
    if not isinstance(version, str) or not mf.VERSION_RE.match(version):
        shown = repr(version) if isinstance(version, str) and len(version) < 80 else type(version).__name__
        raise ManifestError(f"{where}: got {shown}; expected a version id such as v20261204183000123-1a2b3c4d "
                            "(`raydist-loader versions URL --model NAME` lists them)")
    return version


def _stored_version(conn: Connector, model: str, version: str) -> bytes:
    """The stored manifest bytes of ``version`` (its own object; or, in a store of the older layout, the current
    manifest when it is that version)."""
    check_version_id(version)
    try:
        return conn.read(version_manifest_key(model, version))
    except NotFoundError:
        pass
    try:
        stored = conn.read(mf.manifest_key(model))
    except NotFoundError:
        raise NotFoundError(mf.missing_message(conn, model)) from None
    if not is_pointer(stored) and _legacy_version(stored) == version:
        return stored
    raise NotFoundError(
        f"version {version} of model {model!r} does not exist in {conn.describe()} (never published, or deleted "
        f"by gc): `raydist-loader versions {conn.describe()} --model {model}` lists the versions it holds"
    )


def _legacy_version(stored: bytes) -> str | None:
    try:
        return json.loads(stored).get("version")
    except (ValueError, AttributeError):
        return None


def read_manifest_bytes(
    conn: Connector, model: str, version: str | None = None, *, manifest_sha256: str | None = None
) -> tuple[mf.Manifest, bytes]:
    """The validated manifest of ``version`` (None: the current one) and the bytes it was parsed from.

    ``manifest_sha256``: the sha256 its stored bytes must have (what an engine's rank 0 resolved: a replaced or
    damaged version manifest is refused). The current version is always checked against the pointer's. A manifest
    naming another model (the model was copied to this name) is re-rooted under ``model`` and re-serialised."""
    where = conn.describe()
    if version is None:
        cur = read_current(conn, model)
        version, manifest_sha256 = cur.version, manifest_sha256 or cur.manifest_sha256
        stored = cur.legacy if cur.legacy is not None else _stored_version(conn, model, version)
    else:
        stored = _stored_version(conn, model, version)
    if manifest_sha256 is not None and sha256(stored) != manifest_sha256:
        raise VerificationError(
            f"the manifest of {model!r} version {version} in {where} has sha256 {sha256(stored)}, not "
            f"{manifest_sha256} as resolved: a version's manifest never changes, so the store was modified or "
            "damaged: re-publish the model"
        )
    return _parsed(conn, model, version, stored)


def _parsed(conn: Connector, model: str, version: str, stored: bytes) -> tuple[mf.Manifest, bytes]:
    """``stored`` validated as the manifest of ``version`` of ``model``, and the bytes it stands for: ``stored``,
    or re-serialised when it names another model (a copy) and was re-rooted under ``model``."""
    where = conn.describe()
    manifest = mf.Manifest.from_json(stored, where=f"{where} {model}/{version}/manifest.json")
    if manifest.version != version:
        raise ManifestError(f"{where}: the manifest stored for {model!r} version {version} is version "
                            f"{manifest.version}: the store was modified: re-publish the model")
    if manifest.model != model:
        manifest = manifest.renamed(model)
        return manifest, manifest.to_json()
    return manifest, stored


def read_manifest(conn: Connector, model: str, version: str | None = None) -> mf.Manifest:
    """The validated manifest of ``version`` of ``model`` (None: the current one)."""
    return read_manifest_bytes(conn, model, version)[0]


# ------------------------------------------------------------------------------------------ swaps
def _migrate(conn: Connector, model: str, cur: Current | None) -> None:
    """A store of the older layout: keep its manifest as its version's own before a pointer replaces it."""
    if cur is not None and cur.legacy is not None:
        key = version_manifest_key(model, cur.version)
        if not conn.exists(key):
            conn.write(key, cur.legacy)


def swap_to(conn: Connector, model: str, ref: VersionRef, start: bytes | None, *, what: str) -> Pointer:
    """Make ``ref`` current with one compare-and-swap of the pointer against ``start`` (the pointer's bytes when
    the caller began; None: the model had none). The version it replaces is retired now (gc counts its grace
    from then). A writer that changed the pointer meanwhile wins: :class:`ConflictError` (``what`` names the
    caller in it) and nothing changed."""
    cur = _parsed_or_none(conn, model, start)
    _migrate(conn, model, cur)
    now = time.time()
    retired = dict(cur.retired) if cur else {}
    if cur is not None and cur.version != ref.version:
        retired[cur.version] = now
    retired.pop(ref.version, None)
    retired = dict(sorted(retired.items(), key=lambda item: item[1])[-MAX_RETIRED:])
    pointer = Pointer(format=POINTER_FORMAT, version=ref.version, manifest_sha256=ref.manifest_sha256, since=now,
                      retired=retired)
    data, key = pointer.to_json(), mf.manifest_key(model)
    # a client that retried a swap whose reply was lost (botocore, redis-py) finds its own pointer current: it won
    if not conn.compare_and_swap(key, start, data) and stored_pointer(conn, model) != data:
        now_current = current_or_none(conn, model)
        stays = f"version {now_current.version} is current" if now_current else "another writer's version is current"
        raise ConflictError(
            f"{key} in {conn.describe()} changed while this {what} ran (another publish, index or promote of "
            f"{model!r}): version {ref.version} was NOT made current ({stays})"
        )
    return pointer


def _parsed_or_none(conn: Connector, model: str, start: bytes | None) -> Current | None:
    """The pointer ``start`` parsed; None when there is none or it is damaged (a swap replaces a damaged pointer:
    that is how publish and promote repair one; its record of retired versions is lost)."""
    if start is None:
        return None
    try:
        return parse_current(start, f"{conn.describe()} {mf.manifest_key(model)}")
    except RaydistError:
        return None


def stored_pointer(conn: Connector, model: str) -> bytes | None:
    """``<model>/manifest.json``'s bytes now (None: none yet): what a later :func:`swap_to` compares against."""
    try:
        return conn.read(mf.manifest_key(model))
    except NotFoundError:
        return None


def write_version(conn: Connector, manifest: mf.Manifest, start: bytes | None, *, what: str,
                  write=None) -> tuple[mf.Manifest, bytes]:
    """Store ``manifest`` as its version's own (immutable) manifest, then swap the pointer to it. ``write``
    (default ``conn.write``) is how the manifest object is written (publish's ledger, so a failure removes it).
    Returns the manifest as stored and its bytes. A lost race leaves the version complete but not current:
    ``promote`` can make it current later, gc deletes it after its grace."""
    manifest = manifest.model_copy(update={"created": time.time(), "retired": None})
    data = manifest.to_json()
    (write or conn.write)(version_manifest_key(manifest.model, manifest.version), data)
    swap_to(conn, manifest.model, VersionRef(manifest.version, sha256(data)), start, what=what)
    return manifest, data


@dataclass
class PromoteResult:
    model: str
    version: str
    previous: str | None
    changed: bool
    store: str
    warnings: list[str] = field(default_factory=list)


def promote(url: str, model: str, version: str, *, connector_options: dict | None = None) -> PromoteResult:
    """Make an existing, complete version current again (a rollback, or a roll forward to a version that lost a
    publish race). Refused, with one line, for an unknown, gc'd or incomplete version; the swap is the same
    compare-and-swap as publish's. Engines already serving keep their version until they load or update again."""
    from ..connectors import open_connector

    with open_connector(url, **(connector_options or {})) as conn:
        return promote_in(conn, model, version)


def promote_in(conn: Connector, model: str, version: str) -> PromoteResult:
    """:func:`promote` through an open connector."""
    check_version_id(version, "promote: VERSION")
    start = stored_pointer(conn, model)
    if start is None:
        raise NotFoundError(mf.missing_message(conn, model))
    cur = _parsed_or_none(conn, model, start)  # a damaged pointer is repaired by the promote
    if cur is not None and cur.version == version:
        return PromoteResult(model, version, version, False, conn.describe())
    stays = f"version {cur.version} stays current" if cur else "the current pointer is left as it is"
    with brief_lease(conn, model, version, "promote"):  # a gc running meanwhile leaves the version alone
        stored = _stored_version(conn, model, version)
        manifest = _parsed(conn, model, version, stored)[0]
        _check_complete(conn, manifest, version, model, stays)
        mf.check_stored(conn, manifest)  # every span inside its object
        pointer = swap_to(conn, model, VersionRef(version, sha256(stored)), start, what="promote")
        try:  # a gc that looked before the lease was written may have deleted it meanwhile: then undo the swap
            if not conn.exists(version_manifest_key(model, version)):
                raise NotFoundError(f"version {version} of {model!r} was deleted by gc while it was promoted; "
                                    f"{stays}")
            _check_complete(conn, manifest, version, model, stays)
        except NotFoundError:
            conn.compare_and_swap(mf.manifest_key(model), pointer.to_json(), start)
            raise
    return PromoteResult(model, version, cur.version if cur else None, True, conn.describe())


def _check_complete(conn: Connector, manifest: mf.Manifest, version: str, model: str, stays: str) -> None:
    missing = missing_objects(conn, manifest)
    if missing:
        raise NotFoundError(
            f"version {version} of {model!r} is incomplete in {conn.describe()}: {len(missing)} of its objects are "
            f"missing (e.g. {missing[0]!r}: deleted by gc, or its publish never finished): not promoted; {stays}"
        )


def missing_objects(conn: Connector, manifest: mf.Manifest) -> list[str]:
    """The objects ``manifest`` names that the store does not hold (sorted)."""
    keys = sorted(manifest.all_objects())
    return [k for k, size in zip(keys, conn.stat_many(keys), strict=True) if size is None]
