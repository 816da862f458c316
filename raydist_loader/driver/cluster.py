"""Layer 4 (driver): Joining a Ray cluster without the pitfalls of a bare ``ray.init()`` (stale clusters, token
auth)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from ..errors import RaydistError

log = logging.getLogger(__name__)

_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
_TOKEN = Path.home() / ".ray" / "auth_token"


def connect(ray_address: str | None = None, *, probe_timeout_s: float = 3.0, start_local: bool = True) -> bool:
    """Make sure this process is connected to Ray; returns True when this call started the connection.

    Order: an already initialised Ray (never a second ``ray.init``); ``ray_address`` or ``RAY_ADDRESS``; a cluster
    on this node that answers within ``probe_timeout_s``; otherwise a fresh local one (``address="local"``), unless
    ``start_local`` is False (commands that only act on a running cluster, such as ``release``): then an error.
    """
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS") or _local_cluster(probe_timeout_s)
    if not address and not start_local:
        raise RaydistError(
            "no Ray cluster found on this node; give its address (--ray-address ADDR, ray_address= or RAY_ADDRESS)"
        )
    address = address or "local"
    if address != "local" and _TOKEN.exists() and "RAY_AUTH_MODE" not in os.environ:
        _enable_token_auth()
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise RaydistError(
            f"cannot connect to the Ray cluster at {address!r}: {e}. If the cluster uses token auth (Ray >= 2.60 "
            "enables it once ~/.ray/auth_token exists), set RAY_AUTH_MODE=token and make sure the token file is "
            "the cluster's; pass ray_address='local' (CLI: --ray-address local) to start a private local cluster"
        ) from None
    return True


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and its children (Ray 2.60: a cluster started after a local init
    expects the token). Ray reads its config once, at import, so the setting is pushed into it as Ray itself does
    when it enables token auth (``Config.initialize``); without that the join fails after 20 s of retries."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray version: the environment variable is what it reads
        log.debug("could not refresh Ray's config for token auth", exc_info=True)


def _local_cluster(timeout_s: float) -> str | None:
    """The address in /tmp/ray/ray_current_cluster when its GCS answers quickly, else None (a stale file)."""
    try:
        address = _CURRENT_CLUSTER.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return address
    except (OSError, ValueError):
        return None
