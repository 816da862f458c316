"""GPU device check (run on a machine with CUDA; about a minute): ``load_shard(device="cuda")`` inside a process
that chose its GPU with ``torch.cuda.set_device`` lands on that GPU, bit for bit what a CPU load gives.

    python benchmarks/gpu_device_check.py [--mb 64]

For the chunked (publish) and in-place (index) layouts, tp 1 and 2, every rank: a CPU load is the reference; then
``torch.cuda.set_device(0)`` and ``load_shard(device="cuda", verify="full")`` must put every tensor on cuda:0 with
the same bytes, and report ``device == "cuda:0"``. With two or more GPUs it also checks ``set_device(1)`` +
``device="cuda"`` (lands on cuda:1) and ``device="cuda:0"`` while the current device is 1 (lands on cuda:0, and the
caller's current device is still 1 afterwards). Prints one JSON summary; exit 0 when every check passed, 1 if not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydist_loader import index, load_shard, publish  # noqa: E402
from raydist_loader.testing.tiny_models import make_big_llama  # noqa: E402


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check(url: str, model: str, current: int, device: str, expect: int) -> list[str]:
    """Every rank at tp 1 and 2 loaded with ``device`` while ``current`` is the current device: on cuda:``expect``,
    bytes equal to the CPU load. Returns the problems found (empty: all good)."""
    problems = []
    for tp in (1, 2):
        for rank in range(tp):
            where = f"{model} tp={tp} rank={rank} device={device!r} current=cuda:{current}"
            cpu = load_shard(model, url, tp, rank, device="cpu").tensors
            torch.cuda.set_device(current)
            shard = load_shard(model, url, tp, rank, device=device, verify="full")
            if torch.cuda.current_device() != current:
                problems.append(f"{where}: the caller's current device changed to {torch.cuda.current_device()}")
            if shard.report.device != f"cuda:{expect}" or shard.report.failures:
                problems.append(f"{where}: report device {shard.report.device}, failures {shard.report.failures}")
            for name, ref in cpu.items():
                got = shard.tensors[name]
                if got.device != torch.device("cuda", expect):
                    problems.append(f"{where}: {name} on {got.device}")
                elif not _same_bytes(got, ref):
                    problems.append(f"{where}: {name} differs from the CPU load")
            del shard
            torch.cuda.empty_cache()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64.0, help="model size in MB (default 64)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "needs a CUDA device"}))
        return 1
    work = Path(tempfile.mkdtemp(prefix="rl-gpu-device-"))
    try:
        ckpt = make_big_llama(work / "ckpt", int(args.mb * 1e6))
        url = f"file://{work}/store"
        publish(ckpt, url, "chunked", max_tp=2)
        shutil.copytree(ckpt, work / "store" / "inplace")
        index(url, "inplace", max_tp=2)
        gpus = torch.cuda.device_count()
        cases = [(0, "cuda", 0)]  # (current device, device=, expected device)
        if gpus >= 2:
            cases += [(1, "cuda", 1), (1, "cuda:0", 0)]
        problems = [p for model in ("chunked", "inplace") for case in cases for p in check(url, model, *case)]
        result = {
            "ok": not problems,
            "gpu": torch.cuda.get_device_name(0),
            "gpus": gpus,
            "torch": torch.__version__,
            "cases": [f"set_device({c}); device={d!r} -> cuda:{e}" for c, d, e in cases],
            "problems_total": len(problems),
            "problems": problems[:20],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
