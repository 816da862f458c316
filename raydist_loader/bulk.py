"""Layer 0 (base): Bulk phases pause Python's cyclic garbage collector.

Parsing a manifest, planning ranks and loading a shard of a ~20k-tensor MoE create hundreds of thousands of small
objects that live on (records, plans, tensors) and form no reference cycles. Each full collection walks every live
object, and the growth triggers several: measured on a 19k-tensor checkpoint, five full collections took as long as
the whole rest of ``load_shard``. Pausing the collector for such a phase changes no result (nothing it would free
is created) and only delays the next collection; it is re-enabled on exit, and nested or concurrent phases leave it
as the outermost one found it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off (if it was on), and turn it back on after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def bulk(fn: F) -> F:
    """Decorator: ``fn`` runs under :func:`paused_gc`."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with paused_gc():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
