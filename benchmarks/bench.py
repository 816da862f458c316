"""raydist_loader against its peers, in one run on the same data (issue 4).

    python -m benchmarks.bench [--gb 1] [--runs 5]      (``bash benchmarks/run.sh`` sets everything up first)

Generates (or reuses) a bf16 Llama checkpoint, serves it from a local directory, a redis-server and s3rver on
loopback, times raydist_loader (Ray at tp=1 and tp=2, and in-process ``load_shard``) and the peers interleaved
run by run, then prints the tables, writes ``benchmarks/results/latest.json`` and draws the charts.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from . import peers, report
from .servers import start_redis, start_s3rver

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
RESULTS = HERE / "results"
MODEL = "bench-llama"
PUB_MODEL = "bench-publish"  # publish timings write here (and are removed after each)
PUBLISH, READY = "publish", "ready"  # the groups of ways beside the backends
BUCKET = "bench"
SGLANG_PREFIX = "sglang/bench-llama/"
HF_PREFIX = "hf/"
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- set-up
def checkpoint(gb: float) -> Path:
    """A cached transformers-written bf16 Llama of about ``gb`` GB (benchmarks/.data/llama-<gb>gb)."""
    from raydist_loader.testing.tiny_models import make_big_llama

    dest = DATA / f"llama-{gb:g}gb"
    if (dest / "config.json").exists() and list(dest.glob("*.safetensors")):
        return dest
    log(f"generating a {gb:g} GB bf16 Llama checkpoint in {dest} (cached for later runs)")
    tmp = DATA / f".tmp-llama-{gb:g}gb-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_big_llama(tmp, int(gb * 1e9), dtype=torch.bfloat16)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def weight_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def write_sglang_keys(port: int, ckpt: Path) -> list[str]:
    """SGLang's Redis layout: one key per tensor, each a one-tensor safetensors blob."""
    import redis
    from safetensors import safe_open
    from safetensors.torch import save

    client = redis.Redis(host="127.0.0.1", port=port)
    keys = []
    for f in weight_files(ckpt):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                key = SGLANG_PREFIX + name
                client.set(key, save({name: st.get_tensor(name)}))
                keys.append(key)
    client.close()
    return keys


def upload_hf(ckpt: Path) -> list[str]:
    """The raw HF checkpoint in the bucket, for Run:ai and boto3 (which read checkpoints as they are)."""
    s3 = peers._s3_client(8)
    keys = []
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, HF_PREFIX + f.name)
            if f.suffix == ".safetensors":
                keys.append(HF_PREFIX + f.name)
    s3.close()
    return keys


def redis_chunk_sizes(port: int, url: str) -> dict[str, int]:
    """Every value of the chunked Redis store that holds tensor bytes (the keys our tp=1 load reads)."""
    import redis

    from raydist_loader.api import open_manifest

    manifest, _ = open_manifest(url, MODEL)
    objects = sorted(key for key in manifest.all_objects() if key not in {f.object for f in manifest.files.values()})
    client = redis.Redis(host="127.0.0.1", port=port)
    pipe = client.pipeline(transaction=False)
    for key in objects:
        pipe.strlen(key)
    sizes = dict(zip(objects, pipe.execute(), strict=True))
    client.close()
    return sizes


def warm(paths: list[Path]) -> None:
    """Read files once so every local way starts from the same warm page cache."""
    buf = bytearray(64 * MIB)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# --------------------------------------------------------------------------------------------- our loads
def _peak_rss_fn() -> Callable:
    def peak_rss(rank, tensors):  # runs inside each actor, next to its shard
        import resource

        return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return peak_rss


def ours_ray(url: str, tp: int, verify: bool = True, concurrency: int | None = None) -> dict:
    from raydist_loader import load_across_cluster

    t_call = time.time()
    loaded = load_across_cluster(
        MODEL, url, tp=tp, device="cpu", progress=False, ray_address="local", verify=verify, concurrency=concurrency
    )
    try:
        pids, rss = zip(*loaded.run(_peak_rss_fn()), strict=True)
    finally:
        loaded.shutdown()
    wait_exit(pids)
    total = loaded.report.total
    ranks = [
        {k: getattr(r, k) for k in ("rank", "bytes", "bytes_read", "staged_bytes", "chunks", "started", "finished")}
        | {"seconds": r.seconds}
        | {"peak_rss": rss[r.rank]}
        for r in loaded.report.ranks
    ]
    first = min(r["started"] for r in ranks)
    return {
        "bytes": total.bytes,
        "seconds": total.seconds,
        "time_to_ready_s": total.time_to_ready_s,
        # from the call to the first rank's first read (the report's time_to_ready_s ends when the actors are up)
        "first_read_s": first - t_call,
        "start_skew_s": max(r["started"] for r in ranks) - first,
        "t_call": t_call,
        "ranks": ranks,
        "phases": {p.name: [p.start_s, p.end_s] for p in loaded.report.phases},
    }


def ours_inproc(url: str) -> dict:
    """``load_shard`` in this process, wall clock of the whole call; ``fixed_s``: the part that does not grow with
    the bytes (store opened, manifest read and validated, plan made), from the shard's report."""
    from raydist_loader import load_shard

    gc.collect()
    t0 = time.perf_counter()
    shard = load_shard(MODEL, url, 1, 0, device="cpu")
    seconds = time.perf_counter() - t0
    phases = shard.report.phases
    nbytes = shard.report.bytes
    del shard
    gc.collect()
    return {"bytes": nbytes, "seconds": seconds, "fixed_s": phases["manifest_s"] + phases["plan_s"]}


def ours_publish(ckpt: Path, url: str) -> int:
    """``publish`` of the checkpoint as model PUB_MODEL (hashing on, as always)."""
    from raydist_loader.store.publish import publish

    return publish(ckpt, url, PUB_MODEL).bytes


def drop_published(url: str) -> None:
    """Remove what ours_publish wrote (outside the clock), so runs do not pile versions up in the stores."""
    from raydist_loader import open_connector

    with open_connector(url) as conn:
        conn.delete_prefix(f"{PUB_MODEL}/")


def ready_run(url: str, address: str) -> dict:
    """One demo-model load at tp=2 in a fresh driver process (benchmarks/ready.py): joining ``address`` or
    starting a private local Ray (``"local"``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ready", url, address],
        cwd=HERE.parent, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode:
        raise RuntimeError(f"benchmarks.ready {address} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def idle_actor_rss() -> int:
    """Peak RSS of an idle actor that imported what a ShardLoader actor imports (torch, the loader)."""
    import ray

    @ray.remote(num_cpus=0.01)
    class Idle:
        def __init__(self):
            import raydist_loader.load.worker  # noqa: F401 - torch and the loader, as a ShardLoader actor has

        def peak_rss(self) -> int:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    actor = Idle.remote()
    try:
        return ray.get(actor.peak_rss.remote())
    finally:
        ray.kill(actor)


# --------------------------------------------------------------------------------------------- timing
def wait_exit(pids, timeout: float = 10.0) -> None:
    """Wait until killed actors are gone: a dying actor frees its shard and must not overlap the next timing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)


def _cpu_times() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait, total


def settle(min_idle: float = 0.85, timeout: float = 3.0, window: float = 0.2) -> float:
    """Wait (up to ``timeout``) until the machine is at least ``min_idle`` idle over ``window``, so that Ray's
    background work (worker prestart after an actor dies, freeing a shard) does not land in the next timing.
    Returns the idle fraction last seen (recorded with each sample: a busy host shows up in the JSON)."""
    deadline = time.monotonic() + timeout
    idle = 0.0
    while True:
        i0, t0 = _cpu_times()
        time.sleep(window)
        i1, t1 = _cpu_times()
        idle = (i1 - i0) / max(1, t1 - t0)
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle


def timed(fn: Callable[[], int]) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    nbytes = fn()
    seconds = time.perf_counter() - t0
    gc.collect()
    return {"bytes": nbytes, "seconds": seconds}


def _timed(fn: Callable[..., int], *args, after: Callable[[], object] | None = None) -> Callable[[], dict]:
    """``fn(*args)`` timed; ``after`` (clean-up) runs outside the clock."""

    def run() -> dict:
        try:
            return timed(partial(fn, *args))
        finally:
            if after is not None:
                after()

    return run


def publish_ways(ctx: dict, backends: list[str]) -> list[tuple[str, Callable[[], dict]]]:
    """Our publish to each backend, and the peers that put the same checkpoint in the same place."""
    ckpt, files, urls, scratch = ctx["ckpt"], ctx["hf_files"], ctx["urls"], ctx["scratch"]
    ways = []
    for backend in backends:
        url = urls[backend]
        ways.append((f"{backend}: ours publish", _timed(ours_publish, ckpt, url, after=partial(drop_published, url))))
        if backend == "file":
            dest = scratch / "cp"
            drop = partial(shutil.rmtree, dest, ignore_errors=True)
            ways.append(("file: cp", _timed(peers.cp_files, files, dest, after=drop)))
            ways.append(("file: cp + sync", _timed(peers.cp_files, files, dest, True, after=drop)))
        if backend == "s3":
            ways.append(("s3: boto3 upload_file 8 threads", _timed(peers.boto3_upload_file, BUCKET, "up/", files)))
    return ways


def ready_ways(ctx: dict) -> list[tuple[str, Callable[[], dict]]]:
    """The demo model's time to ready: joining this benchmark's running cluster, and a private local Ray."""
    url = ctx["demo_url"]
    return [("join a running cluster", partial(ready_run, url, ctx["gcs_address"])),
            ("private local Ray", partial(ready_run, url, "local"))]


def build_ways(ctx: dict, backends: list[str]) -> dict[str, list[tuple[str, Callable[[], dict]]]]:
    """Per backend, the ways in the order they run (reversed on odd runs, so none always goes first)."""
    files, urls, buf = ctx["hf_files"], ctx["urls"], ctx["ceiling_buf"]
    nbytes = sum(f.stat().st_size for f in files)
    peer_ways: dict[str, list[tuple[str, Callable[[], dict]]]] = {
        "file": [
            ("page-cache readinto", _timed(peers.page_cache_readinto, files, buf)),
            ("readinto, fresh buffer", _timed(peers.page_cache_readinto, files)),
            ("first-touch alloc", _timed(peers.first_touch, nbytes)),
            ("Run:ai streamer", _timed(peers.runai_streamer, [str(f) for f in files])),
            ("safetensors load_file", _timed(peers.safetensors_load_file, files)),
        ],
    }
    if "redis" in backends:
        peer_ways["redis"] = [
            ("RESP ceiling", _timed(peers.resp_ceiling_read, ctx["redis_port"], ctx["redis_sizes"], buf)),
            ("SGLang GET per tensor", _timed(peers.sglang_redis, ctx["redis_port"], ctx["sglang_keys"])),
        ]
    if "s3" in backends:
        s3_keys = ctx["hf_s3_keys"]
        sizes = [f.stat().st_size for f in files]
        peer_ways["s3"] = [
            ("boto3 8x16MiB ranges", _timed(peers.boto3_ranges, BUCKET, s3_keys, sizes, buf)),
            ("boto3 8x16MiB, fresh buffer", _timed(peers.boto3_ranges, BUCKET, s3_keys, sizes)),
            ("Run:ai streamer", _timed(peers.runai_streamer, [f"s3://{BUCKET}/{k}" for k in s3_keys])),
        ]
    ways = {}
    for backend in backends:
        url = urls[backend]
        ways[backend] = [
            ("ours tp=1", partial(ours_ray, url, 1)),
            ("ours tp=2", partial(ours_ray, url, 2)),
            ("ours tp=1 no-verify", partial(ours_ray, url, 1, verify=False)),
            ("ours load_shard", partial(ours_inproc, url)),
        ] + peer_ways[backend]
    ways[PUBLISH] = publish_ways(ctx, backends)
    ways[READY] = ready_ways(ctx)
    return ways


def run_all(ways: dict, runs: int, ctx: dict, backends: list[str]) -> tuple[dict, list[int]]:
    """Every way of every group (the backends, then publish and time-to-ready) once per run, interleaved."""
    groups = [*backends, PUBLISH, READY]
    samples: dict[str, dict[str, list[dict]]] = {b: {w: [] for w, _ in ways[b]} for b in groups}
    idle: list[int] = []
    for run in range(runs):
        idle.append(idle_actor_rss())
        for backend in groups:
            if backend in ("file", PUBLISH):
                warm(ctx["hf_files"] + ctx["store_files"])
            order = ways[backend] if run % 2 == 0 else list(reversed(ways[backend]))
            for name, fn in order:
                idle_before = settle()
                s = fn()
                s["idle_before"] = round(idle_before, 3)
                s["gbps"] = s["bytes"] / s["seconds"] / 1e9
                samples[backend][name].append(s)
            if backend == READY:
                line = ", ".join(f"{n} {samples[backend][n][-1]['seconds']:.2f} s" for n, _ in ways[backend])
            else:
                line = ", ".join(f"{n} {samples[backend][n][-1]['gbps']:.2f}" for n, _ in ways[backend]) + " GB/s"
            log(f"run {run + 1}/{runs} {backend}: {line}")
    return samples, idle


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1; 0.25 for a quick run)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per way; medians are reported (default 5)")
    ap.add_argument("--backends", default="file,redis,s3", help="comma-separated subset of file,redis,s3")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where latest.json and the PNGs go")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    started = time.time()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RUNAI_STREAMER_LOG_LEVEL", "WARNING")

    ckpt = checkpoint(args.gb)
    hf_files = weight_files(ckpt)
    servers = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-store-", dir=DATA))
    try:
        import ray

        from raydist_loader.store.publish import publish

        from .servers import s3_env

        redis_srv = start_redis()
        servers.append(redis_srv)
        s3_srv = start_s3rver(BUCKET)
        servers.append(s3_srv)
        os.environ.update(s3_env(s3_srv.port))  # before ray.init: the actors inherit it
        urls = {
            "file": f"file://{scratch}",
            "redis": f"redis://127.0.0.1:{redis_srv.port}/0",
            "s3": f"s3://{BUCKET}/store?endpoint_url=http://127.0.0.1:{s3_srv.port}",
        }
        log(
            f"checkpoint {ckpt} ({sum(f.stat().st_size for f in hf_files) / 1e9:.2f} GB); "
            f"redis-server :{redis_srv.port}, s3rver :{s3_srv.port}"
        )
        publishes = {}
        for backend in backends:
            res = publish(ckpt, urls[backend], MODEL)
            publishes[backend] = {"seconds": res.seconds, "objects": res.objects, "bytes": res.bytes}
            log(f"published to {backend}: {res.objects} objects, {res.bytes / 1e9:.2f} GB in {res.seconds:.1f}s")
        from .ready import MODEL as DEMO_MODEL
        from .ready import demo_checkpoint

        demo_url = f"file://{scratch}/demo-store"
        publish(demo_checkpoint(DATA / "demo-llama"), demo_url, DEMO_MODEL)
        ctx = {
            "ckpt": ckpt,
            "scratch": scratch,
            "hf_files": hf_files,
            "store_files": sorted(p for p in scratch.rglob("*") if p.is_file()),
            "urls": urls,
            "redis_port": redis_srv.port,
            "demo_url": demo_url,
        }
        if "redis" in backends:
            ctx["sglang_keys"] = write_sglang_keys(redis_srv.port, ckpt)
            ctx["redis_sizes"] = redis_chunk_sizes(redis_srv.port, urls["redis"])
        if "s3" in backends:
            ctx["hf_s3_keys"] = upload_hf(ckpt)
        biggest = max(sum(f.stat().st_size for f in hf_files), sum(ctx.get("redis_sizes", {}).values()))
        ctx["ceiling_buf"] = peers.prefaulted(biggest)  # one preallocated, prefaulted buffer for the ceilings
        log("set-up done; starting Ray")
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        ctx["gcs_address"] = ray.get_runtime_context().gcs_address
        ways = build_ways(ctx, backends)
        samples, idle = run_all(ways, args.runs, ctx, backends)
        result = report.summarise(samples, idle, backends)
        result["samples"] = samples  # every timing, with idle_before and (ours) per-rank reports
        result["meta"] = {
            "gb": args.gb,
            "runs": args.runs,
            "checkpoint_bytes": sum(f.stat().st_size for f in hf_files),
            "config": json.loads((ckpt / "config.json").read_text()),
            "publish": publishes,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "ray": ray.__version__,
            },
            "wall_s": time.time() - started,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        print(report.render(result))
        (args.out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
        report.charts(result, samples, args.out)
        log(f"wrote {args.out / 'latest.json'}, latest.png and timeline.png in {time.time() - started:.0f}s")
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            for s in servers:
                s.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
