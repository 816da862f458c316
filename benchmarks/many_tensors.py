"""Per-tensor overhead (issue 10, item 2): publish, inspect, load_shard and a Ray load of a checkpoint with a real
MoE's tensor count at tiny sizes (transformers ``qwen3_moe``, 48 layers x 128 experts, hidden 64: 18,867 tensors,
~40 MB of bf16), from a file store published at max_tp 4.

    python -m benchmarks.many_tensors --runs 3 --out benchmarks/results/many_tensors.json

Every way is timed ``--runs`` times (median reported) with both the wall clock and ``time.process_time`` of this
process (the CPU it spent in all its threads; a Ray load's actors are other processes, so there it is the driver's
share only), and the 1-minute load average before each sample: on a shared host the CPU figure is the steadier one.
Imports are done before any timing; the Ray session is started once, before the Ray loads.

Ways: ``publish`` (checkpoint dir -> file store, max_tp 4, a fresh store each run), ``inspect --tp 4`` (the API call
that the CLI prints: manifest read, parse, check, every rank planned), ``load_shard`` (rank 1 of tp=4, call to
return, device cpu), ``ray load`` (``load_across_cluster`` at tp=4 on CPU bundles, verified: placement, actors
started with their plans, pull, verification; time-to-ready and the pull are in the report), plus the manifest size.
``ray load, tiny llama`` is the same Ray load of a 2-layer llama, interleaved with it: what starting 4 actors costs
on this host whatever the model, so the difference is what the tensor count adds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import raydist_loader as rl  # noqa: E402
from raydist_loader.testing.tiny_models import make_many_tensor_moe, make_tiny_checkpoint  # noqa: E402

DATA = Path(__file__).resolve().parent / ".data" / "many-tensors-moe"
MODEL = "moe"
TARGETS_S = {"publish": 8.0, "inspect_tp4": 3.0, "load_shard_tp4": 2.5, "ray_load_tp4": 10.0}
MAX_MANIFEST_BYTES = 10 * 1024 * 1024


def checkpoint(path: Path) -> Path:
    """The cached checkpoint (written once by transformers; ~5 s)."""
    if not (path / "model.safetensors").exists():
        make_many_tensor_moe(path)
    return path


def timed(fn) -> dict:
    """One sample: wall and process CPU seconds of ``fn()``, the load average before it, and its result."""
    load = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "loadavg": load, "out": out}


def summarize(samples: list[dict]) -> dict:
    return {
        "wall_s": statistics.median(s["wall_s"] for s in samples),
        "cpu_s": statistics.median(s["cpu_s"] for s in samples),
        "loadavg": statistics.median(s["loadavg"] for s in samples),
        "samples": [{k: v for k, v in s.items() if k != "out"} for s in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA, help="where the checkpoint is cached")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray load")
    args = parser.parse_args()

    import ray  # noqa: F401 - imported before timing, as an engine process has it

    ckpt = checkpoint(args.data)
    work = Path(tempfile.mkdtemp(prefix="rl-many-"))
    url = f"file://{work}/store"
    results: dict = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        pubs = []
        for _ in range(args.runs):
            shutil.rmtree(work / "store", ignore_errors=True)
            pubs.append(timed(lambda: rl.publish(ckpt, url, MODEL, max_tp=4)))
        pub = pubs[-1]["out"]
        results["tensors"], results["chunks"], results["bytes"] = pub.tensors, pub.chunks, pub.bytes
        results["manifest_bytes"] = (work / "store" / MODEL / "manifest.json").stat().st_size
        results["publish"] = summarize(pubs)
        results["inspect_tp4"] = summarize([timed(lambda: rl.inspect(url, MODEL, tp=4)) for _ in range(args.runs)])
        shards = [timed(lambda: rl.load_shard(MODEL, url, 4, 1, device="cpu")) for _ in range(args.runs)]
        results["load_shard_tp4"] = summarize(shards)
        results["load_shard_tp4"]["phases"] = shards[-1]["out"].report.phases
        results["load_shard_tp4"]["shard_bytes"] = shards[-1]["out"].report.bytes
        del shards
        if not args.no_ray:
            tiny = make_tiny_checkpoint("llama", work / "tiny", dtype=torch.bfloat16)
            rl.publish(tiny, url, "tiny", max_tp=4)
            results["ray_load_tp4"], results["ray_load_tp4_tiny_llama"] = ray_load(url, args.runs, "tiny")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["targets_s"] = TARGETS_S
    results["max_manifest_bytes"] = MAX_MANIFEST_BYTES
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def ray_load(url: str, runs: int, baseline: str) -> tuple[dict, dict]:
    """The Ray load of the MoE and of the tiny ``baseline`` model, interleaved, ``runs`` times each."""
    import ray

    def once(model: str) -> dict:
        with rl.load_across_cluster(model, url, tp=4, device="cpu", progress=False) as loaded:
            assert loaded.report.verified
            return {"time_to_ready_s": loaded.report.total.time_to_ready_s, "pull_s": loaded.report.total.seconds}

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    samples: dict[str, list[dict]] = {MODEL: [], baseline: []}
    try:
        for _ in range(runs):
            for model in samples:
                samples[model].append(timed(lambda m=model: once(m)))
    finally:
        ray.shutdown()
    out = []
    for model in (MODEL, baseline):
        row = summarize(samples[model])
        for key in ("time_to_ready_s", "pull_s"):
            row[key] = statistics.median(s["out"][key] for s in samples[model])
        out.append(row)
    return out[0], out[1]


def report(r: dict) -> str:
    lines = [
        f"{r['tensors']} tensors, {r['chunks']} chunks, {r['bytes'] / 1e6:.1f} MB; manifest "
        f"{r['manifest_bytes'] / 2**20:.2f} MiB (target <= {r['max_manifest_bytes'] / 2**20:.0f} MiB)",
        f"{'way':<16} {'wall s':>8} {'cpu s':>8} {'target s':>9} {'load avg':>9}",
    ]
    for way, target in r["targets_s"].items():
        if way in r:
            w = r[way]
            lines.append(f"{way:<16} {w['wall_s']:>8.2f} {w['cpu_s']:>8.2f} {target:>9.1f} {w['loadavg']:>9.1f}")
    for way in ("ray_load_tp4", "ray_load_tp4_tiny_llama"):
        if way in r:
            w = r[way]
            lines.append(
                f"  {way}: wall {w['wall_s']:.2f} s = time-to-ready {w['time_to_ready_s']:.2f} s + pull and verify "
                f"{w['pull_s']:.2f} s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
