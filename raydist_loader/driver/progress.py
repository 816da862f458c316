"""Layer 4 (driver): Live progress at the driver: bytes per rank and overall GB/s (rich when installed, else quiet
lines)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


def show(poll: Callable[[], list[tuple[int, int]]], stop: threading.Event, interval: float = 0.5) -> None:
    """Refresh a progress display from ``poll()`` -> [(done, total) per rank] until ``stop`` is set."""
    t0 = time.perf_counter()
    try:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
    except ImportError:
        return _plain(poll, stop, interval, t0)
    with Progress(
        TextColumn("rank {task.fields[rank]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=False
    ) as bar:
        tasks: list[int] = []
        while True:
            try:
                states = poll()
            except Exception:  # noqa: BLE001 - progress must never break a load
                states = []
            for rank, (done, total) in enumerate(states):
                if rank >= len(tasks):
                    tasks.append(bar.add_task("", total=total or None, rank=rank))
                bar.update(tasks[rank], completed=done, total=total or None)
            if stop.wait(interval):
                return


def _plain(poll, stop: threading.Event, interval: float, t0: float) -> None:
    while not stop.wait(max(interval, 2.0)):
        try:
            states = poll()
        except Exception:  # noqa: BLE001
            continue
        done = sum(d for d, _ in states)
        total = sum(t for _, t in states) or 1
        rate = done / (time.perf_counter() - t0) / 1e9
        print(f"raydist-loader: {done / 1e9:.2f}/{total / 1e9:.2f} GB ({rate:.2f} GB/s)", file=sys.stderr)
