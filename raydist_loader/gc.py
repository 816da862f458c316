"""``gc``: delete versions of a model that its manifest no longer names and that are older than a grace period.

Only prefixes that look like our version ids (``vYYYYmmddHHMMSSmmm-xxxxxxxx``, which sort by time) are ever touched, so
original checkpoint files indexed in place and anything else an operator keeps under the model's name are left
alone. A version is deleted only when it is older than the current one AND the version that replaced it was published
more than ``grace_s`` ago: a reader that read the old manifest just before the swap can finish its load. Versions
newer than the current one (a publish still writing) are never touched.
"""

from __future__ import annotations

import calendar
import time

from .connectors import open_connector
from .manifest import VERSION_RE, check_model_name, manifest_key, read_manifest

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
    now = time.time()
    with open_connector(url, **(connector_options or {})) as conn:
        manifest = read_manifest(conn, model)
        current = manifest.version
        in_use = {key.split("/")[len(model.split("/"))] for key in manifest.objects()}
        versions: dict[str, list[str]] = {}
        for key in conn.list(f"{model}/"):
            head = key[len(model) + 1 :].split("/", 1)[0]
            if VERSION_RE.match(head) and key != manifest_key(model):
                versions.setdefault(head, []).append(key)
        order = sorted(set(versions) | {current})
        deleted, kept, n = [], [], 0
        for version, keys in sorted(versions.items()):
            prefix = f"{model}/{version}/"
            successor = order[order.index(version) + 1] if version < current else None
            if successor is None or version in in_use or now - _created(successor) < grace_s:
                kept.append(prefix)
                continue
            deleted.append(prefix)
            if not dry_run:
                for key in keys:
                    conn.delete(key)
                n += len(keys)
    return {"current": current, "deleted": deleted, "kept": kept, "objects": n, "dry_run": dry_run}


def _created(version: str) -> float:
    return calendar.timegm(time.strptime(version[1:15], "%Y%m%d%H%M%S")) + int(version[15:18]) / 1000
