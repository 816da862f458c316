"""Layer 5 (entry points): raydist_loader: a Ray-distributed, verified loader for tensor-parallel model weights.

Entry points: ``load_across_cluster``, ``load_shard`` (Ray imported on first use), ``publish``, ``index``,
``publish_state_dict`` (a state dict from memory; ``open_version`` for one version published by several processes),
``UpdatePublisher`` (an RL trainer's versions from memory, each stored as deltas against the one before),
``inspect``, ``inspect_config`` (size a model from its config.json alone), ``verify``, ``pull_files``, ``gc``,
``release`` (end a held load's actors from any driver), ``versions`` (every version of a model, current, leased,
when gc may delete it), ``promote`` (make a version current again: a rollback), ``resolve_version``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .connectors import open_connector, register_connector
from .driver.held import release
from .errors import (
    BackendError,
    ConfigError,
    ConflictError,
    ManifestError,
    NotFoundError,
    PlacementError,
    RaydistError,
    ShardingError,
    VerificationError,
)
from .store.files import pull_files
from .store.gc import gc, versions
from .store.publish import index, publish
from .store.sizing import inspect_config
from .store.summary import inspect
from .store.verify import manifest_sha256, verify
from .store.versions import promote

__version__ = "0.1.0"

# Ray is imported only when a load starts; torch only when tensors are published from memory or loaded.
_LAZY = {"load_across_cluster": "api", "load_shard": "api", "resolve_version": "api", "LoadedModel": "api",
         "Shard": "api", "publish_state_dict": "store.memory", "open_version": "store.memory",
         "UpdatePublisher": "store.updates"}

__all__ = [
    *_LAZY,
    "publish",
    "index",
    "inspect",
    "inspect_config",
    "verify",
    "manifest_sha256",
    "pull_files",
    "gc",
    "versions",
    "promote",
    "release",
    "open_connector",
    "register_connector",
    "RaydistError",
    "ConfigError",
    "ManifestError",
    "NotFoundError",
    "ShardingError",
    "BackendError",
    "VerificationError",
    "ConflictError",
    "PlacementError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'raydist_loader' has no attribute {name!r}")
