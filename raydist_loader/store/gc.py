"""Layer 3 (store commands): ``gc``: delete versions of a model that its manifest no longer names, once no reader or
writer can need them.

Only prefixes that look like our version ids (``vYYYYmmddHHMMSSmmm-xxxxxxxx``) are ever touched, so original
checkpoint files indexed in place and anything else an operator keeps under the model's name are left alone. The
grace period never counts from a version id (stamped when its publish *started*, possibly hours before its swap):

* a version that was current is deleted ``grace_s`` after it stopped being current, as recorded by the manifest
  swap that replaced it (``retired`` in the manifest): a reader that read the old manifest just before the swap can
  finish its load;
* any other version (a publish that died, or one still writing; or one whose record is lost) is deleted once nothing
  has written to it for ``grace_s`` AND the current version has been current for ``grace_s`` (it may have been
  current until then). A version whose objects the store cannot date (a Redis with an LFU policy) is kept.

Times come from the clocks of the publishing host (``retired``) and of the store (object write times).
"""

from __future__ import annotations

import time

from ..connectors import Connector, open_connector
from .manifest import VERSION_RE, Manifest, check_model_name, manifest_key, read_manifest

DEFAULT_GRACE_S = 3600.0


def gc(
    url: str,
    model: str,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    connector_options: dict | None = None,
) -> dict:
    """Returns ``{"current": version, "deleted": [prefix...], "kept": [prefix...], "objects": n}``."""
    check_model_name(model)
    with open_connector(url, **(connector_options or {})) as conn:
        manifest = read_manifest(conn, model)
        current = manifest.version
        in_use = {key.split("/")[len(model.split("/"))] for key in manifest.all_objects()}
        versions: dict[str, list[str]] = {}
        for key in conn.list(f"{model}/"):
            head = key[len(model) + 1 :].split("/", 1)[0]
            if VERSION_RE.match(head) and key != manifest_key(model):
                versions.setdefault(head, []).append(key)
        now = time.time()
        deleted, kept, n = [], [], 0
        for version, keys in sorted(versions.items()):
            prefix = f"{model}/{version}/"
            quiet = None if version == current or version in in_use else _unused_since(conn, manifest, version, keys)
            if quiet is None or now - quiet < grace_s:
                kept.append(prefix)
                continue
            deleted.append(prefix)
            if not dry_run:
                for key in keys:
                    conn.delete(key)
                n += len(keys)
    return {"current": current, "deleted": deleted, "kept": kept, "objects": n, "dry_run": dry_run}


def _unused_since(conn: Connector, manifest: Manifest, version: str, keys: list[str]) -> float | None:
    """Since when nothing can use ``version`` (seconds since the epoch), or None when that cannot be told."""
    retired = (manifest.retired or {}).get(version)
    if retired is not None:
        return retired
    written = [t for t in conn.modified(keys) if t is not None]
    return max(max(written), manifest.created) if written else None
