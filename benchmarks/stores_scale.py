"""Stores at scale (issue 22), in one run on the same data: ``load_shard`` from a 3-master Redis Cluster vs one
Redis, and from s3rver vs boto3's own range GETs into fresh memory.

    python -m benchmarks.stores_scale [--gb 0.5] [--runs 5] [--parts cluster,s3] [--profile DIR]

Every run times each way once, ours and the peer interleaved (the order reversed on odd runs); the table gives
median GB/s and the median of the per-run ratios. The cluster row also gives the bytes and requests each master
served in one instrumented load (its connector's ``traffic``). ``--profile DIR`` writes a cProfile of one
``load_shard`` from S3 there (what our path does per byte that boto3's ``.read()`` does not).
Results go to ``benchmarks/results/stores_scale.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from . import peers
from .bench import BUCKET, RESULTS, checkpoint, log, upload_hf
from .servers import Server, free_port, s3_env, start_redis, start_s3rver

MODEL = "scale-llama"


def start_cluster(masters: int = 3) -> list[Server]:
    """``masters`` cluster-mode redis-servers on loopback joined by ``redis-cli --cluster create`` (no replicas:
    a benchmark of reads, not of failover)."""
    binary = shutil.which("redis-server")
    if not binary or not shutil.which("redis-cli"):
        raise RuntimeError("redis-server and redis-cli must be on PATH (apt-get install redis-server redis-tools)")
    nodes = []
    for _ in range(masters):
        port = free_port()
        while port + 10000 > 65535:
            port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        nodes.append(Server("redis-cluster-node", argv, port, workdir))
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-yes"], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while b"cluster_state:ok" not in subprocess.run(
        ["redis-cli", "-p", str(nodes[0].port), "cluster", "info"], capture_output=True
    ).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    return nodes


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def clocked(fn) -> dict:
    """``fn()`` (it returns the bytes it loaded) timed: wall seconds, and ``cpu_s``, this process's CPU seconds (user
    + system, every thread) over the same span: what a way costs per byte beside the wall clock (on a shared host
    the store's server needs the rest). Garbage is collected before and after, outside both clocks."""
    gc.collect()
    c0, t0 = _cpu_s(), time.perf_counter()
    nbytes = fn()
    seconds, cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    gc.collect()
    return {"bytes": nbytes, "seconds": seconds, "cpu_s": cpu_s}


def ours(url: str) -> int:
    """``load_shard`` of the whole model (tp=1) in this process; the bytes it loaded."""
    from raydist_loader import load_shard

    return load_shard(MODEL, url, 1, 0, device="cpu").report.bytes


def traffic(url: str) -> dict[str, dict[str, int]]:
    """Requests and payload bytes each server answered in one load_shard-equivalent load (same worker code, with
    the connector kept so its counters can be read)."""
    from raydist_loader.connectors import open_connector
    from raydist_loader.load.worker import ShardLoader
    from raydist_loader.store.versions import read_manifest

    with open_connector(url) as conn:
        loader = ShardLoader(url, read_manifest(conn, MODEL), 1, 0, device="cpu", connector=conn)
        try:
            loader.load()
        finally:
            loader.close()
        return {node: {"requests": r, "bytes": b} for node, (r, b) in sorted(conn.traffic.items())}


def measure(ways: dict[str, callable], runs: int) -> dict[str, list[dict]]:
    samples: dict[str, list[dict]] = {name: [] for name in ways}
    for run in range(runs):
        order = list(ways) if run % 2 == 0 else list(reversed(ways))
        for name in order:
            sample = clocked(ways[name])
            samples[name].append(sample)
            log(f"run {run + 1}/{runs} {name}: {sample['bytes'] / sample['seconds'] / 1e9:.2f} GB/s, "
                f"{sample['cpu_s'] / sample['bytes'] * 1e9:.2f} CPU s/GB")
    return samples


def summary(samples: dict[str, list[dict]], ours_way: str, peer_way: str) -> dict:
    gbps = {name: [s["bytes"] / s["seconds"] / 1e9 for s in runs] for name, runs in samples.items()}
    ratios = [a / b for a, b in zip(gbps[ours_way], gbps[peer_way], strict=True)]
    cpu = {name: [s["cpu_s"] / s["bytes"] * 1e9 for s in runs] for name, runs in samples.items()}
    return {
        "median_gbps": {name: statistics.median(v) for name, v in gbps.items()},
        "median_cpu_s_per_gb": {name: statistics.median(v) for name, v in cpu.items()},
        "gbps": gbps,
        "ratio": {"ways": f"{ours_way} / {peer_way}", "median": statistics.median(ratios), "per_run": ratios},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parts", default="cluster,s3")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args(argv)
    from raydist_loader import publish

    ckpt = checkpoint(args.gb)
    parts = args.parts.split(",")
    result: dict = {"gb": args.gb, "runs": args.runs, "cpus": os.cpu_count()}
    servers: list[Server] = []
    try:
        if "cluster" in parts:
            one = start_redis()
            nodes = start_cluster(3)
            servers += [one, *nodes]
            one_url, cluster_url = f"redis://127.0.0.1:{one.port}/0", f"redis://127.0.0.1:{nodes[0].port}/0"
            for url in (one_url, cluster_url):
                publish(ckpt, url, MODEL)
            samples = measure({"one Redis": lambda: ours(one_url), "3-master cluster": lambda: ours(cluster_url)},
                              args.runs)
            result["cluster"] = summary(samples, "3-master cluster", "one Redis")
            result["cluster"]["traffic"] = {"3-master cluster": traffic(cluster_url), "one Redis": traffic(one_url)}
        if "s3" in parts:
            s3 = start_s3rver(BUCKET)
            servers.append(s3)
            os.environ.update(s3_env(s3.port))
            url = f"s3://{BUCKET}/store"
            publish(ckpt, url, MODEL)
            keys = upload_hf(ckpt)
            s3c = peers._s3_client(8)
            sizes = [s3c.head_object(Bucket=BUCKET, Key=k)["ContentLength"] for k in keys]
            s3c.close()
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                profiled = (("ours", lambda: ours(url)), ("boto3", lambda: peers.boto3_ranges(BUCKET, keys, sizes)))
                for name, fn in profiled:
                    prof = cProfile.Profile()
                    prof.runcall(fn)
                    prof.dump_stats(str(args.profile / f"s3-{name}.prof"))
            samples = measure(
                {"ours load_shard": lambda: ours(url),
                 "boto3 8x16MiB ranges, fresh buffer": lambda: peers.boto3_ranges(BUCKET, keys, sizes)},
                args.runs,
            )
            result["s3"] = summary(samples, "ours load_shard", "boto3 8x16MiB ranges, fresh buffer")
    finally:
        for server in servers:
            server.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stores_scale.json").write_text(json.dumps(result, indent=1))
    for part in ("cluster", "s3"):
        if part in result:
            med, ratio = result[part]["median_gbps"], result[part]["ratio"]
            cpu = result[part]["median_cpu_s_per_gb"]
            rows = ", ".join(f"{k} {v:.2f} GB/s ({cpu[k]:.2f} CPU s/GB)" for k, v in med.items())
            print(f"{part}: {rows}; {ratio['ways']} = {ratio['median']:.2f}x (median of per-run ratios)")
            if "traffic" in result[part]:
                print(f"  per server: {json.dumps(result[part]['traffic'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
