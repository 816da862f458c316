"""Where the GPU path's H2D time goes (run on a machine with CUDA; under a minute): plain pinned copies of the same
bytes cut as the loader cuts them, against the loader's pull phase with reads that cost nothing, at several copy
sizes and concurrencies.

    python benchmarks/gpu_h2d_probe.py [--gb 1] [--runs 3] [--out gpu_h2d.json]

Rows: one pinned copy of everything; pieces of 32/64/128 MiB from a ring of pinned buffers on one stream, and on
8 threads with a stream each (what the loader does); then ``load_shard(device="cuda", verify=False)`` through a
connector whose reads do nothing, at concurrency 1/2/4/8 and group/part sizes 32/64/128 MiB (its pull phase).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_path import NullConnector  # noqa: E402
from raydist_loader import load_shard, publish, register_connector  # noqa: E402
from raydist_loader.load.transfer_gpu import GpuTransfer  # noqa: E402
from raydist_loader.testing.tiny_models import make_big_llama  # noqa: E402

MIB = 1 << 20


def pieces(host: torch.Tensor, dev: torch.Tensor, size: int, threads: int, slots: int) -> float:
    """Copy ``host`` to ``dev`` in ``size`` pieces staged through ``slots`` pinned buffers, ``threads`` at once."""
    n = host.numel()
    starts = list(range(0, n, size))
    ring = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    events: list = [None] * slots
    lock = threading.Lock()
    todo = iter(range(len(starts)))

    def worker(k: int) -> None:
        stream = torch.cuda.Stream()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            slot = i % slots
            if events[slot] is not None:
                events[slot].synchronize()
            a = starts[i]
            b = min(a + size, n)
            buf = ring[slot][: b - a]
            buf.copy_(host[a:b])  # the "read" (a host copy: what a page-cache read costs at least)
            with torch.cuda.stream(stream):
                dev[a:b].copy_(buf, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events[slot] = ev

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="gpu_h2d.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rl-h2d-"))
    try:
        ckpt = make_big_llama(work / "ckpt", int(args.gb * 1e9))
        url = f"file://{work}/store"
        nbytes = publish(ckpt, url, "big", max_tp=8).bytes
        register_connector("null", NullConnector)
        null = url.replace("file://", "null://", 1)
        host = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        rows: dict[str, float] = {}

        def best(fn) -> float:
            fn()  # warm (pinned host cache, streams)
            return statistics.median(fn() for _ in range(args.runs))

        def whole() -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        rows["pinned copy, one piece"] = best(whole)
        for mib in (32, 64, 128):
            for threads in (1, 8):
                rows[f"pinned ring, {mib} MiB pieces, {threads} thread(s)"] = best(
                    lambda m=mib, t=threads: pieces(host, dev, m * MIB, t, t + 1)
                )
        default_part, original = GpuTransfer.part_bytes, GpuTransfer._groups
        for mib in (32, 64, 128):
            GpuTransfer.part_bytes = mib * MIB
            GpuTransfer._groups = lambda self, reads, _o=original, _m=mib: _o(self, reads, target=_m * MIB)
            try:
                for conc in (1, 2, 4, 8):
                    def pull(c=conc) -> float:
                        shard = load_shard("big", null, 1, 0, device="cuda", verify=False, concurrency=c)
                        return shard.report.phases["pull_s"]

                    rows[f"ours pull phase (null reads), {mib} MiB groups, concurrency {conc}"] = best(pull)
            finally:
                GpuTransfer._groups, GpuTransfer.part_bytes = original, default_part
        result = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "bytes": nbytes,
            "gbps": {k: nbytes / v / 1e9 for k, v in rows.items()},
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
        for k, v in result["gbps"].items():
            print(f"{v:7.1f} GB/s  {k}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
