"""Aside (testing, imported by no product module): How much a process grows while it loads one shard, or verifies a
model (tests and benchmarks of staging memory).

:func:`load_growth` runs ``load_shard`` (:func:`verify_growth`: ``verify`` of a whole model) in a fresh
interpreter: the baseline is its resident size after importing torch and raydist_loader, the peak its resident
high-water mark (``VmHWM``; unlike ``ru_maxrss`` it does not carry the forking parent's peak).
:func:`write_big_tensor` writes a checkpoint of one big row-parallel tensor, the case whose staging used to grow
with the tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: the tensor write_big_tensor writes: a llama down_proj, split on dim 1 (row-parallel)
BIG_TENSOR = "model.layers.0.mlp.down_proj.weight"

_PROBE = """
import json, os, sys
import torch
import raydist_loader as rl
from raydist_loader.testing.memory import tensor_xxh3
from raydist_loader.load.transfer import Transfer

url, model, tp, rank, part, concurrency = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
if part:
    Transfer.part_bytes = part
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
shard = rl.load_shard(model, url, tp, rank, device="cpu", concurrency=concurrency or None)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
t = shard.tensors[sys.argv[7]]
print(json.dumps({"base": base, "peak": peak, "shard": shard.report.bytes, "verified": shard.report.verified,
                  "seconds": shard.report.seconds, "xxh3": tensor_xxh3(t), "shape": list(t.shape)}))
"""


def load_growth(
    url: str, model: str, tp: int, rank: int = 0, *, part_bytes: int = 0, concurrency: int = 0,
    tensor: str = BIG_TENSOR, timeout_s: float = 600,
) -> dict:
    """Load one shard in a fresh process; returns ``base``, ``peak``, ``growth`` (= peak - base) and ``shard``
    bytes, whether it ``verified``, its load ``seconds``, and ``shape`` and ``xxh3`` (:func:`tensor_xxh3`) of
    ``tensor``.
    ``part_bytes``: the staging part size to use (0: the default); ``concurrency`` 0: the connector's default."""
    args = [url, model, str(tp), str(rank), str(part_bytes), str(concurrency), tensor]
    return _run_probe(_PROBE, args, "load_shard", timeout_s)


_STREAM_PROBE = """
import json, os, sys
import torch
from raydist_loader.engines.handoff import EngineOptions, rank_weights
from raydist_loader.load.transfer import Transfer

url, model, tp, rank, part, concurrency = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
if part:
    Transfer.part_bytes = part
options = EngineOptions.parse({"url": url, "model": model, "concurrency": concurrency or None}, "probe")
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
weights, report = rank_weights(options, tp, rank)
count = 0
for name, tensor in weights:  # the engine copies each tensor into its parameter and drops it
    count += 1
    del tensor
r = report()
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": peak, "shard": r.bytes, "verified": r.verified, "tensors": count,
                  "seconds": r.seconds}))
"""


def stream_growth(
    url: str, model: str, tp: int, rank: int = 0, *, part_bytes: int = 0, concurrency: int = 0, timeout_s: float = 600
) -> dict:
    """Stream one shard through the engine hand-off (:func:`~raydist_loader.engines.handoff.rank_weights`, each
    tensor dropped once taken) in a fresh process; returns ``base``, ``peak``, ``growth``, ``shard`` bytes, whether
    it ``verified``, the ``tensors`` handed over and the load ``seconds``. Options as in :func:`load_growth`."""
    args = [url, model, str(tp), str(rank), str(part_bytes), str(concurrency)]
    return _run_probe(_STREAM_PROBE, args, "rank_weights", timeout_s)


_VERIFY_PROBE = """
import json, os, sys
import torch
import raydist_loader as rl
from raydist_loader.store import chunks

url, model, part, concurrency = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5])
if part:
    chunks.PART_BYTES = part
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
result = rl.verify(url, model, concurrency=concurrency)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": peak, "ok": result.ok, "bytes": result.bytes, "chunks": result.chunks,
                  "failures": result.failures}))
"""


def verify_growth(url: str, model: str, *, part_bytes: int = 0, concurrency: int = 4, timeout_s: float = 600) -> dict:
    """``verify`` a whole model in a fresh process; returns ``base``, ``peak``, ``growth``, whether it was ``ok``,
    the ``bytes`` and ``chunks`` it checked and its ``failures``. ``part_bytes``: the part size (0: the default)."""
    return _run_probe(_VERIFY_PROBE, [url, model, str(part_bytes), str(concurrency)], "verify", timeout_s)


def _run_probe(code: str, args: list[str], what: str, timeout_s: float) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode:
        raise RuntimeError(f"{what} in a child process failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["growth"] = got["peak"] - got["base"]
    return got


def tensor_xxh3(t) -> str:
    """xxh3-128 of a tensor's row-major bytes (to compare a loaded tensor with an independent slice)."""
    import torch

    from raydist_loader.digest import xxh3

    return xxh3(t.contiguous().view(-1).view(torch.uint8).numpy())


def write_big_tensor(dest: str | Path, rows: int, cols: int, seed: int = 0):
    """A checkpoint (llama config + ``model.safetensors``) holding only :data:`BIG_TENSOR`, ``[rows, cols]`` bf16
    random; returns the tensor."""
    import torch
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": rows, "num_attention_heads": 8, "intermediate_size": cols}
    (dest / "config.json").write_text(json.dumps(config))
    weight = torch.empty(rows, cols, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    for r in range(0, rows, 64):  # in row blocks: no float32 copy of the whole tensor
        weight[r : r + 64] = torch.randn(min(64, rows - r), cols, generator=gen)
    save_file({BIG_TENSOR: weight}, dest / "model.safetensors")
    return weight
