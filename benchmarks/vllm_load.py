"""vLLM rows of the benchmark (issue 9): weight-load seconds inside vLLM's own workers, raydist vs vLLM's loaders.

    .venv/bin/python -m benchmarks.vllm_load [--mb 970] [--dtype bf16] [--rounds 5]   (after `bash scripts/setup.sh`)

A Llama of about ``--mb`` MB in ``--dtype`` (transformers-written, cached in benchmarks/.data; the engine runs in the
same dtype, so vLLM's loaders copy without a cast) is published to a file store and to a redis-server on loopback.
Then one vLLM engine per TP size (1, 2) is started with ``load_format="raydist"``, and in it, round after round
(order reversed every other round), every worker builds a fresh copy of the model and vLLM's
``load_weights`` is timed for each way: ``raydist`` from the file store and from Redis (pull + verify + hand-off),
vLLM's own ``safetensors`` loader on the checkpoint directory (page cache warm after the first round), and
``runai_streamer`` on the same directory when ``runai-model-streamer`` is installed in .venv-vllm. A TP group is
loaded when its slowest worker is, so a sample is the max over workers; the table gives medians and the ratio to
``safetensors`` at the same TP. After the timed rounds, one more load per way, into a model whose parameters were
written first (on CPU they are host memory), records how much the worker's host memory grew at most above what it
held (``peak_hwm``: the kernel's high-water mark, file pages a loader maps included; ``peak_anon``: anonymous memory
sampled every ms): the loader's own host memory. raydist's log gives, per rank, how many tensors went straight
into vLLM's parameters and how many through ``load_weights``. Results: benchmarks/results/vllm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .servers import start_redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "bench-vllm-llama"
ENGINE = {"enforce_eager": True, "dtype": "float32", "skip_tokenizer_init": True, "max_model_len": 128,
          "max_num_seqs": 4}


def log(msg: str) -> None:
    print(f"[vllm-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp32": (torch.float32, "float32")}


def checkpoint(mb: int, dtype: str = "fp32") -> Path:
    from raydist_loader.testing.tiny_models import make_big_llama

    dest = DATA / f"vllm-llama-{mb}mb-{dtype}"
    if not (dest / "config.json").exists():
        log(f"generating a {mb} MB {dtype} Llama in {dest} (cached)")
        tmp = DATA / f".tmp-{dest.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_big_llama(tmp, mb * 1_000_000, dtype=DTYPES[dtype][0])
        tmp.rename(dest)
    return dest


def has_runai() -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('runai_model_streamer') else 1)"
    return subprocess.run([str(VLLM_PY), "-c", probe], check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=970, help="checkpoint size in MB (default 970)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="checkpoint and engine dtype")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per way; medians are reported")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vllm.json")
    args = ap.parse_args(argv)
    if not VLLM_PY.exists():
        raise SystemExit(f"{VLLM_PY} is missing: run `bash scripts/setup.sh` (it creates .venv-vllm)")
    import raydist_loader as rl

    ckpt = checkpoint(args.mb, args.dtype)
    nbytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    redis = start_redis()
    scratch = Path(tempfile.mkdtemp(prefix="vllm-bench-", dir=DATA))
    try:
        stores = {"file": f"file://{scratch}/store", "redis": f"redis://127.0.0.1:{redis.port}/0"}
        for url in stores.values():
            rl.publish(ckpt, url, MODEL, max_tp=2)
        cfg = scratch / "cfg"
        rl.pull_files(stores["file"], MODEL, cfg)
        ways = [{"label": f"raydist {kind}", "load_format": "raydist", "extra": {"url": url, "model": MODEL}}
                for kind, url in stores.items()]
        ways.append({"label": "safetensors", "load_format": "safetensors", "model": str(ckpt)})
        if has_runai():
            ways.append({"label": "runai_streamer", "load_format": "runai_streamer", "model": str(ckpt)})
        else:
            log("runai-model-streamer is not installed in .venv-vllm: no runai_streamer row "
                "(.venv-vllm/bin/pip install runai-model-streamer)")
        runs = [
            {"name": f"tp{tp}", "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0"},
             "llm": {"model": str(cfg), "load_format": "raydist", "tensor_parallel_size": tp, **ENGINE,
                     "dtype": DTYPES[args.dtype][1], "model_loader_extra_config": ways[0]["extra"]},
             "timed": ways, "rounds": args.rounds, "memory": True}
            for tp in (1, 2)
        ]
        spec, out, engine_log = scratch / "spec.json", scratch / "out.json", scratch / "engines.log"
        spec.write_text(json.dumps({"runs": runs}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}
        log(f"checkpoint {ckpt.name}: {nbytes / 1e6:.0f} MB; starting vLLM at tp=1 and tp=2 ({args.rounds} rounds)")
        started = time.time()
        with open(engine_log, "wb") as f:
            subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_engine.py"), str(spec), str(out)],
                           stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
        results = json.loads(out.read_text()) if out.exists() else {}
        failed = {n: r["error"] for n, r in results.items() if r["error"]}
        if len(results) < len(runs) or failed:
            raise SystemExit(f"vLLM runs failed: {failed or 'no results'}\n{engine_log.read_text()[-4000:]}")
        table = summarise(results, nbytes, split(engine_log.read_text(errors="replace"), stores))
        log(f"engines done in {time.time() - started:.0f} s")
        print(render(table))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "note": "shared 2-core VM: other jobs ran at the same time"}
        args.out.write_text(json.dumps({"checkpoint_bytes": nbytes, "dtype": args.dtype, "rounds": args.rounds,
                                        "machine": machine, "staging_bound_bytes": staging_bound(stores),
                                        "rows": table, "samples": {n: r["load_s"] for n, r in results.items()}},
                                       indent=2) + "\n")
        log(f"wrote {args.out}")
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


_RAYDIST_LINE = re.compile(
    r"raydist: rank \d+/(\d+): .* from (\S+): .* into the model in ([\d.]+) s .*; (\d+) tensors read straight into "
    r"parameters in ([\d.]+) s, (\d+) through load_weights in ([\d.]+) s \(capture ([\d.]+) s\)"
)


def staging_bound(stores: dict[str, str]) -> dict[str, int]:
    """Per store, the streamed hand-off's host staging bound at the connector's default concurrency:
    (concurrency + 2) parts of PART_BYTES (plus one fallback tensor group, at most PART_BYTES unless one tensor is
    bigger)."""
    from raydist_loader.connectors import open_connector
    from raydist_loader.store.chunks import PART_BYTES

    out = {}
    for kind, url in stores.items():
        with open_connector(url) as conn:
            out[kind] = (conn.default_concurrency + 2) * PART_BYTES
    return out


def split(log: str, stores: dict[str, str]) -> dict[tuple[int, str], dict]:
    """(tp, "raydist <store>") -> per rank medians from the loader's own log lines: seconds in all, reading
    straight into parameters, streaming the rest through load_weights, the capture; and how many tensors went
    each way."""
    kind = {url: k for k, url in stores.items()}
    seen: dict[tuple[int, str], list[tuple]] = {}
    for tp, store, total, direct, land, fallback, stream, capture in _RAYDIST_LINE.findall(log):
        row = (float(total), float(land), float(stream), float(capture), int(direct), int(fallback))
        seen.setdefault((int(tp), f"raydist {kind.get(store, store)}"), []).append(row)
    keys = ("loader_s", "direct_s", "through_load_weights_s", "capture_s", "direct_tensors", "fallback_tensors")
    return {k: {key: statistics.median(r[i] for r in v) for i, key in enumerate(keys)} for k, v in seen.items()}


def summarise(results: dict, nbytes: int, parts: dict) -> list[dict]:
    rows = []
    for name, result in results.items():
        tp = int(name.removeprefix("tp"))
        reference = statistics.median(result["load_s"]["safetensors"])
        for label, samples in result["load_s"].items():
            median = statistics.median(samples)
            peaks = {key: statistics.median(result[key][label]) if result.get(key) else None
                     for key in ("peak_hwm", "peak_anon")}
            rows.append({"tp": tp, "way": label, "median_s": median, "min_s": min(samples), "max_s": max(samples),
                         "gbps": nbytes / median / 1e9, "speedup_vs_safetensors": reference / median,
                         "host_peak_hwm_bytes": peaks["peak_hwm"], "host_peak_anon_bytes": peaks["peak_anon"],
                         **parts.get((tp, label), {})})
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"{'tp':>2}  {'way':<16} {'median s':>9} {'range s':>13} {'GB/s':>6} {'x safetensors':>13}"
             f" {'host peak MB (hwm/anon)':>24}  raydist per rank: direct s + load_weights s (tensors)"]
    for r in rows:
        part = ""
        if "direct_s" in r:
            part = (f"{r['direct_s']:.3f} + {r['through_load_weights_s']:.3f} ({r['direct_tensors']:.0f} direct, "
                    f"{r['fallback_tensors']:.0f} through load_weights; capture {r['capture_s']:.3f} s)")
        hwm, anon = r["host_peak_hwm_bytes"], r["host_peak_anon_bytes"]
        peak = f"{hwm / 1e6:.0f} / {anon / 1e6:.0f}" if hwm is not None else ""
        lines.append(f"{r['tp']:>2}  {r['way']:<16} {r['median_s']:>9.3f} {r['min_s']:>6.3f}-{r['max_s']:<6.3f} "
                     f"{r['gbps']:>6.2f} {r['speedup_vs_safetensors']:>12.2f}x {peak:>24}  {part}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
