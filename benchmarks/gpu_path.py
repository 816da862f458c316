"""GPU path check and measurement (run on a machine with CUDA): correctness of the pinned staging ring, and
H2D throughput of a load to ``cuda`` against a plain pinned-to-device copy, all in one run.

    python benchmarks/gpu_path.py --gb 2 --runs 5 --out results/gpu.json

Ways (median of --runs, interleaved): our load to cpu, our load to cuda (page-cache file store, tp=1 and one rank
of tp=2), a plain pinned host->device copy of the same bytes, and safetensors.torch.load_file(device="cuda").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydist_loader import index, load_shard, publish  # noqa: E402
from raydist_loader.connectors import register_connector  # noqa: E402
from raydist_loader.connectors.file import FileConnector  # noqa: E402
from raydist_loader.testing.tiny_models import make_big_llama  # noqa: E402


def _sync() -> None:
    torch.cuda.synchronize()


def _timed(fn) -> tuple[float, object]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


class NullConnector(FileConnector):
    """Reads cost nothing (bytes stay as they are): what is left of a load is staging + H2D + bookkeeping."""

    schemes = ("null",)

    def __init__(self, url: str):
        super().__init__(url.replace("null://", "file://", 1))

    def readinto_many(self, requests) -> None:
        return None


def check_correctness(url: str, model: str) -> dict:
    """cuda shards equal cpu shards bit for bit (chunked and in-place layouts, tp 1 and 2, verify full)."""
    checked = 0
    for tp in (1, 2):
        for rank in range(tp):
            cpu = load_shard(model, url, tp, rank, device="cpu").tensors
            gpu = load_shard(model, url, tp, rank, device="cuda", verify="full")
            assert gpu.report.failures == [] and gpu.report.digest == gpu.report.expected_digest
            for name, t in cpu.items():
                g = gpu.tensors[name]
                assert g.is_cuda and g.dtype == t.dtype and g.shape == t.shape, name
                assert torch.equal(g.cpu(), t), (model, tp, rank, name)
                checked += 1
    return {"model": model, "tensors_checked": checked}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight per rank")
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    work = Path(tempfile.mkdtemp(prefix="rl-gpu-"))
    t0 = time.perf_counter()
    ckpt = make_big_llama(work / "ckpt", int(args.gb * 1e9))
    url = f"file://{work}/store"
    pub = publish(ckpt, url, "big", max_tp=8)
    shutil.copytree(ckpt, work / "store" / "hf")
    index(url, "hf", max_tp=8)
    setup_s = time.perf_counter() - t0
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bytes": pub.bytes,
        "setup_s": setup_s,
        "publish_gbps": pub.gbps,
    }
    if not args.skip_correctness:
        result["correctness"] = [check_correctness(url, "big"), check_correctness(url, "hf")]
    register_connector("null", NullConnector)
    null = url.replace("file://", "null://", 1)
    c = args.concurrency
    result["concurrency"] = c

    nbytes = pub.bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    files = sorted(ckpt.glob("*.safetensors"))
    from safetensors.torch import load_file

    ways = {
        "pinned_h2d_copy": lambda: dev.copy_(host, non_blocking=True),
        "ours_h2d_stage_only": lambda: load_shard("big", null, 1, 0, device="cuda", verify=False, concurrency=c),
        "ours_cpu_tp1": lambda: load_shard("big", url, 1, 0, device="cpu", concurrency=c),
        "ours_cuda_tp1": lambda: load_shard("big", url, 1, 0, device="cuda", concurrency=c),
        "ours_cuda_tp1_noverify": lambda: load_shard("big", url, 1, 0, device="cuda", verify=False, concurrency=c),
        "ours_cuda_tp2_rank0": lambda: load_shard("big", url, 2, 0, device="cuda", concurrency=c),
        "safetensors_load_file_cuda": lambda: [load_file(f, device="cuda") for f in files],
    }
    sizes = {k: nbytes for k in ways}
    sizes["ours_cuda_tp2_rank0"] = None
    times: dict[str, list[float]] = {k: [] for k in ways}
    pulls: list[float] = []
    setups: list[float] = []
    for _ in range(args.runs):
        for name, fn in ways.items():
            seconds, out = _timed(fn)
            if sizes[name] is None:
                sizes[name] = out.report.bytes
            if name == "ours_h2d_stage_only":  # steady state: the pull phase alone, without per-load set-up
                pulls.append(out.report.phases["pull_s"])
                setups.append(seconds - out.report.phases["pull_s"])
            times[name].append(seconds)
            del out
            torch.cuda.empty_cache()
    result["gbps"] = {k: sizes[k] / statistics.median(v) / 1e9 for k, v in times.items()}
    result["seconds"] = times
    result["gbps"]["ours_h2d_pull_phase"] = nbytes / statistics.median(pulls) / 1e9
    result["h2d_setup_s"] = statistics.median(setups)
    g = result["gbps"]
    result["ratios"] = {
        "cuda_vs_cpu_load": g["ours_cuda_tp1"] / g["ours_cpu_tp1"],
        "cuda_load_vs_pinned_copy": g["ours_cuda_tp1"] / g["pinned_h2d_copy"],
        "h2d_stage_vs_pinned_copy": g["ours_h2d_stage_only"] / g["pinned_h2d_copy"],
        "h2d_pull_phase_vs_pinned_copy": g["ours_h2d_pull_phase"] / g["pinned_h2d_copy"],
        "cuda_vs_safetensors_cuda": g["ours_cuda_tp1"] / g["safetensors_load_file_cuda"],
        "digest_cost": 1 - g["ours_cuda_tp1"] / g["ours_cuda_tp1_noverify"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result.get(k)
                for k in ("device", "bytes", "concurrency", "gbps", "ratios", "h2d_setup_s", "correctness")
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
