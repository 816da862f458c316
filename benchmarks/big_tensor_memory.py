"""Staging memory with one big tensor (issue 10, item 4): how much a process grows while ``load_shard`` loads one
row-parallel tensor (default [2048, 262144] bf16, 1 GiB) from a file store, chunked (published at max_tp 8) and in
place (indexed), at tp=1 and tp=2 (rank 0), with the default staging part (64 MiB) and concurrency.

    python -m benchmarks.big_tensor_memory [--rows 2048 --cols 262144] [--out results/big_tensor_memory.json]

Each load runs in a fresh interpreter (:func:`raydist_loader.testing.memory.load_growth`): growth = resident
high-water mark - resident size after importing torch. Target: growth <= shard + (concurrency + 1) x 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import raydist_loader as rl  # noqa: E402
from raydist_loader.connectors.file import FileConnector  # noqa: E402
from raydist_loader.load.transfer import PART_BYTES  # noqa: E402
from raydist_loader.testing.memory import load_growth, write_big_tensor  # noqa: E402

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=262144)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rl-bigmem-"))
    results = []
    try:
        weight = write_big_tensor(work / "ckpt", args.rows, args.cols)
        del weight
        url = f"file://{work}/store"
        rl.publish(work / "ckpt", url, "chunked")
        (work / "store" / "inplace").mkdir()
        for f in (work / "ckpt").iterdir():
            os.link(f, work / "store" / "inplace" / f.name)
        rl.index(url, "inplace")
        bound_extra = (FileConnector.default_concurrency + 1) * PART_BYTES
        for model in ("chunked", "inplace"):
            for tp in (1, 2):
                got = load_growth(url, model, tp)
                row = {"layout": model, "tp": tp, "shard_mib": got["shard"] / MIB, "growth_mib": got["growth"] / MIB,
                       "above_shard_mib": (got["growth"] - got["shard"]) / MIB, "allowed_above_mib": bound_extra / MIB,
                       "seconds": got["seconds"], "verified": got["verified"]}
                results.append(row)
                print(f"{model:<8} tp={tp}: shard {row['shard_mib']:.0f} MiB, grew {row['growth_mib']:.0f} MiB "
                      f"({row['above_shard_mib']:+.0f} above the shard; allowed {row['allowed_above_mib']:.0f}), "
                      f"{row['seconds']:.2f} s, verified={row['verified']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": args.rows, "cols": args.cols, "loads": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
