"""Layer 0 (base): The error types raydist_loader raises.

Every user-facing problem is a :class:`RaydistError` subclass whose message says what was received and how to fix
it; the CLI prints such errors as one line (no traceback) and exits with status 2 (1 for a failed verification).
"""

from __future__ import annotations


class RaydistError(Exception):
    """Base class: an error the user can act on. Its message never contains a secret."""


class ConfigError(RaydistError, ValueError):
    """Bad user input: a config file, a rule, an argument."""


class MissingDependencyError(RaydistError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class NotFoundError(RaydistError, FileNotFoundError):
    """A model, manifest or object does not exist in the store."""


class ManifestError(RaydistError, ValueError):
    """A manifest is garbled or disagrees with itself; the message names the field."""


class ShardingError(RaydistError, ValueError):
    """A tensor cannot be cut as asked (unknown tensor, unserved tp, bad shape)."""


class BackendError(RaydistError, OSError):
    """The store failed (unreachable, auth, protocol). ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ConflictError(RaydistError):
    """Another writer changed the store first (concurrent publishes of one model): this write did not take effect."""


class VerificationError(RaydistError):
    """Bytes that landed differ from the digests recorded at publish time. ``failures`` holds one record per wrong
    chunk or file (``rank`` when known, ``tensor`` and ``chunk`` or ``file``, ``expected`` and ``got`` or
    ``error``); :func:`describe_failures` prints them."""

    def __init__(self, message: str, failures: list[dict] | None = None):
        super().__init__(message)
        self.failures = failures or []


def describe_failures(failures: list[dict], limit: int = 10) -> str:
    """One line per failure: replica and rank (when known), tensor and chunk (or file), and why."""
    lines = []
    for f in failures[:limit]:
        where = f"rank {f['rank']}: " if "rank" in f else ""
        where = f"replica {f['replica']} {where}" if "replica" in f else where
        what = f"file {f['file']}" if "file" in f else f"tensor {f['tensor']} chunk {f['chunk']}"
        why = f["error"] if "error" in f else f"digest {f['got']} != expected {f['expected']}"
        lines.append(f"{where}{what}: {why}")
    more = f" (+{len(failures) - limit} more)" if len(failures) > limit else ""
    return f"{len(failures)} chunk(s) failed verification{more}:\n  " + "\n  ".join(lines)


class PlacementError(RaydistError):
    """A Ray placement group could not be scheduled in time."""
