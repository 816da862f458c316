"""Replicas share one pull (issue 13): load time and bytes the store sends for one TP group, for two sharing one
pull, and for two loading on their own at the same time.

    python -m benchmarks.replicas [--gb 0.5] [--runs 3] [--tp 2] [--backends redis,file] [--part-mib 128]

Per run and backend, interleaved (the order flips on odd runs): ``replicas=1``; ``replicas=2`` (each chunk read by
one replica, the other gets it through Ray's object store and verifies it); and two ``replicas=1`` loads started
together from two threads (what two replicas cost without sharing). Bytes sent: Redis' ``INFO stats``
``total_net_output_bytes`` before and after (the server's own count); for files, the reports' ``bytes_read``.
Seconds: from the call to a verified LoadedModel (actors start included) and the pull alone (first read started to
last rank done). Writes ``benchmarks/results/replicas.json``; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .bench import MODEL, RESULTS, checkpoint, log, wait_exit
from .servers import start_redis

WAYS = ("replicas=1", "replicas=2", "2 x replicas=1")


def sent(port: int | None) -> int:
    """Bytes redis-server has sent so far (0 for a directory)."""
    if port is None:
        return 0
    import redis

    with redis.Redis(host="127.0.0.1", port=port) as client:
        return int(client.info("stats")["total_net_output_bytes"])


def _load(url: str, tp: int, replicas: int):
    from raydist_loader import load_across_cluster

    return load_across_cluster(MODEL, url, tp=tp, replicas=replicas, device="cpu", progress=False,
                               ray_address="local")


def one(url: str, port: int | None, tp: int, way: str) -> dict:
    """Time one way once; every actor is gone before it returns."""
    before, t0 = sent(port), time.perf_counter()
    if way == "2 x replicas=1":
        results: list = [None, None]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _load(url, tp, 1))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loads = results
    else:
        loads = [_load(url, tp, int(way[-1]))]
    wall = time.perf_counter() - t0
    store = sent(port) - before
    ranks = [r for loaded in loads for r in loaded.report.ranks]
    assert all(loaded.report.verified for loaded in loads)
    pids = [pid for loaded in loads for pid in loaded.run(_pid)]
    for loaded in loads:
        loaded.shutdown()
    wait_exit(pids)
    started = min(r.started for r in ranks)
    return {
        "wall_s": wall,
        "pull_s": max(r.finished for r in ranks) - started,
        "store_bytes": store if port is not None else sum(r.bytes_read for r in ranks),
        "shard_bytes": sum(r.bytes for r in ranks),
        "from_peers": sum(r.bytes_from_peers for r in ranks),
    }


def _pid(rank, tensors):
    import os

    return os.getpid()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--backends", default="redis,file")
    p.add_argument("--part-mib", type=float, default=None, help="size of a shared part (default: share.PART_BYTES)")
    args = p.parse_args(argv)
    if args.part_mib:
        from raydist_loader.load import share

        share.PART_BYTES = int(args.part_mib * (1 << 20))

    import ray

    import raydist_loader as rl

    ckpt = checkpoint(args.gb)
    model_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    stores: dict[str, tuple[str, int | None]] = {}
    servers = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    backends = args.backends.split(",")
    if "redis" in backends:
        server = start_redis()
        servers.append(server)
        stores["redis"] = (f"redis://127.0.0.1:{server.port}/0", server.port)
    if "file" in backends:
        stores["file"] = (f"file://{scratch}/store", None)
    for name, (url, _) in stores.items():
        log(f"publishing {ckpt.name} to {name}")
        rl.publish(ckpt, url, MODEL, max_tp=8)
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    samples: dict[str, dict[str, list[dict]]] = {b: {w: [] for w in WAYS} for b in stores}
    try:
        for run in range(args.runs):
            order = WAYS if run % 2 == 0 else WAYS[::-1]
            for backend, (url, port) in stores.items():
                for way in order:
                    sample = one(url, port, args.tp, way)
                    samples[backend][way].append(sample)
                    log(f"run {run + 1} {backend} {way}: {sample['wall_s']:.2f} s to ready, pull "
                        f"{sample['pull_s']:.2f} s, store sent {sample['store_bytes'] / 1e9:.3f} GB")
    finally:
        ray.shutdown()
        for server in servers:
            server.stop()
    medians = {
        b: {w: {k: statistics.median(s[k] for s in ss) for k in ss[0]} for w, ss in ways.items()}
        for b, ways in samples.items()
    }
    print(f"\nreplicas: {args.gb:g} GB bf16 Llama ({model_bytes / 1e9:.3f} GB of weights), tp={args.tp}, "
          f"{args.runs} runs, medians")
    print(f"{'backend':<8} {'way':<16} {'ready s':>8} {'pull s':>7} {'store GB':>9} {'x model':>8} {'peers GB':>9}")
    for backend, ways in medians.items():
        for way, m in ways.items():
            print(f"{backend:<8} {way:<16} {m['wall_s']:>8.2f} {m['pull_s']:>7.2f} {m['store_bytes'] / 1e9:>9.3f} "
                  f"{m['store_bytes'] / model_bytes:>8.2f} {m['from_peers'] / 1e9:>9.3f}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "gb": args.gb, "tp": args.tp, "runs": args.runs, "model_bytes": model_bytes,
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "medians": medians, "samples": samples,
    }
    (RESULTS / "replicas.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {RESULTS / 'replicas.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
