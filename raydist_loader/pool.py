"""Layer 0 (base): A bounded thread pool that fails fast: the one way this package runs I/O in parallel; and the cutting
of work into batches of bounded size."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")


def run_all(fn: Callable[[Any], Any], items: Iterable[Any], concurrency: int, name: str = "raydist") -> list:
    """``fn`` over ``items`` on at most ``concurrency`` threads (I/O and hashing release the GIL); results in
    order. The first failure, whichever item raised it, cancels every item not yet started and is re-raised."""
    items = list(items)
    with ThreadPoolExecutor(max(1, min(concurrency, len(items))), thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            raise failed.exception()
        return [f.result() for f in futures]


def batches(items: Sequence[T], max_bytes: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` of at most ``max_bytes`` in total by ``size`` (an item larger than that
    alone)."""
    batch: list[T] = []
    total = 0
    for item in items:
        if batch and total + size(item) > max_bytes:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch
