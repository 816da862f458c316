"""SGLang rows of the benchmark (issue 19): weight-load seconds inside SGLang's own workers, raydist vs SGLang's
``remote`` loader (the seed's RemoteModelLoader, PR #3964) and SGLang's default loader.

    .venv/bin/python -m benchmarks.sglang_load [--mb 970]      (after `bash scripts/setup.sh`)

A bf16 Llama of about ``--mb`` MB (transformers-written, cached in benchmarks/.data) is published to a file store and
to a redis-server on loopback. For each TP size (1, 2), one after another (one run, interleaved): SGLang's default
loader on the checkpoint directory (page cache warm: the publish read it), which then writes SGLang's own per-rank
copy to the same Redis (``Engine.save_remote_model``); raydist from Redis; raydist from the file store; SGLang's
``remote`` loader from Redis. Each is one engine start; a way's load time is SGLang's own ``Load weight end.
elapsed=`` (model init + weights), per TP group the slowest worker. Also the bytes each store holds for the model
(SGLang's remote store holds each rank's state dict: one set per tp it serves). Results: benchmarks/results/sglang.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .servers import start_redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"
SGLANG_PY = ROOT / ".venv-sglang" / "bin" / "python"
MODEL = "bench-sglang-llama"
ENGINE = {"dtype": "bfloat16", "max_total_tokens": 512, "mem_fraction_static": 0.15}  # room for 0.97 GB of weights
_LOAD_END = re.compile(r"^\[[^\]]*?(?: TP(\d+))?\] Load weight end\. elapsed=([\d.]+) s", re.M)


def log(msg: str) -> None:
    print(f"[sglang-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def checkpoint(mb: int) -> Path:
    from raydist_loader.testing.tiny_models import make_big_llama

    dest = DATA / f"sglang-llama-{mb}mb-bf16"
    if not (dest / "config.json").exists():
        log(f"generating a {mb} MB bf16 Llama in {dest} (cached)")
        tmp = DATA / f".tmp-{dest.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_big_llama(tmp, mb * 1_000_000, dtype=torch.bfloat16)
        tmp.rename(dest)
    return dest


def redis_bytes(port: int, prefix: str) -> int:
    """Bytes of the values under ``prefix`` in the Redis on ``port``."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    total = 0
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        total += client.strlen(key) if client.type(key) == b"string" else 0
    return total


def runs_for(tp: int, ckpt: Path, cfg: Path, stores: dict[str, str], remote: str) -> list[dict]:
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {}
    base = {"tp_size": tp, **ENGINE}
    raydist = [{"name": f"tp{tp} raydist {kind}", "env": env,
                "engine": {**base, "model_path": str(cfg), "load_format": "raydist",
                           "model_loader_extra_config": json.dumps({"url": url, "model": MODEL})}}
               for kind, url in stores.items()]
    return [
        {"name": f"tp{tp} sglang default", "env": env, "engine": {**base, "model_path": str(ckpt)},
         "steps": [{"label": "save_remote", "save_remote": f"{remote}-tp{tp}"}]},
        *raydist[::-1],  # redis first
        {"name": f"tp{tp} sglang remote", "env": env,
         "engine": {**base, "model_path": f"{remote}-tp{tp}", "load_format": "remote",
                    "served_model_name": f"{MODEL}-remote-tp{tp}"}},
    ]


def load_seconds(text: str) -> float | None:
    """The slowest worker's ``Load weight end. elapsed=`` in one engine's log."""
    found = [float(s) for _, s in _LOAD_END.findall(text)]
    return max(found) if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=970, help="checkpoint size in MB (default 970)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes (default 1 2)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sglang.json")
    args = ap.parse_args(argv)
    if not SGLANG_PY.exists():
        raise SystemExit(f"{SGLANG_PY} is missing: run `bash scripts/setup.sh` (it creates .venv-sglang)")
    import raydist_loader as rl

    ckpt = checkpoint(args.mb)
    nbytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    redis = start_redis()
    scratch = Path(tempfile.mkdtemp(prefix="sglang-bench-", dir=DATA))
    try:
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        stores = {"file": f"file://{scratch}/store", "redis": redis_url}
        for url in stores.values():
            rl.publish(ckpt, url, MODEL, max_tp=2)
        cfg = scratch / "cfg"
        rl.pull_files(stores["file"], MODEL, cfg)
        remote = f"redis://127.0.0.1:{redis.port}/{MODEL}-remote"
        rows, held = [], {}
        for tp in args.tp:
            for run in runs_for(tp, ckpt, cfg, stores, remote):
                seconds, error, phases = one_engine(scratch, run)
                rows.append({"tp": tp, "way": run["name"].split(" ", 1)[1], "load_s": seconds, "error": error,
                             "raydist_phases": phases})
                log(f"{run['name']}: {seconds} s {phases}" + (f" ERROR {error[:300]}" if error else ""))
            remote_bytes = redis_bytes(redis.port, f"{MODEL}-remote-tp{tp}/")
            held[f"sglang remote (per-rank state dicts, serves tp={tp} only)"] = remote_bytes
        held["raydist redis (any tp)"] = redis_bytes(redis.port, f"{MODEL}/")
        held["raydist file (any tp)"] = sum(f.stat().st_size for f in (scratch / "store").rglob("*") if f.is_file())
        for row in rows:
            ref = next((r["load_s"] for r in rows if r["tp"] == row["tp"] and r["way"] == "sglang remote"), None)
            row["x_remote"] = ref / row["load_s"] if ref and row["load_s"] else None
        print(render(rows, held, nbytes))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "note": "shared 2-core VM: other jobs ran at the same time; one run"}
        args.out.write_text(json.dumps({"checkpoint_bytes": nbytes, "machine": machine, "rows": rows,
                                        "store_bytes": held}, indent=2) + "\n")
        log(f"wrote {args.out}")
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def one_engine(scratch: Path, run: dict) -> tuple[float | None, str | None, list[str]]:
    """Start one engine (tests/sglang_engine.py, its own process) and read its load time from its log (and the
    raydist loader's seconds per phase, one entry per rank)."""
    tag = re.sub(r"\W+", "-", run["name"])
    spec, out, engine_log = scratch / f"{tag}.json", scratch / f"{tag}-out.json", scratch / f"{tag}.log"
    spec.write_text(json.dumps({"runs": [run]}))
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(engine_log, "wb") as f:
        subprocess.run([str(SGLANG_PY), str(ROOT / "tests" / "sglang_engine.py"), str(spec), str(out)],
                       stdout=f, stderr=subprocess.STDOUT, env=env, check=False, cwd=scratch)
    text = engine_log.read_text(errors="replace")
    result = json.loads(out.read_text()).get(run["name"], {}) if out.exists() else {}
    error = result.get("error") if result else f"no result; end of log: {text[-1500:]}"
    phases = re.findall(r"s per phase: ([^)]*)\)", text)
    return load_seconds(text), error, phases


def render(rows: list[dict], held: dict[str, int], nbytes: int) -> str:
    lines = [f"{'tp':>2}  {'way':<20} {'load s':>8} {'GB/s':>6} {'x remote':>9}"]
    for r in rows:
        s = r["load_s"]
        lines.append(f"{r['tp']:>2}  {r['way']:<20} {s if s is not None else float('nan'):>8.2f} "
                     f"{nbytes / s / 1e9 if s else float('nan'):>6.2f} "
                     f"{r['x_remote'] if r['x_remote'] else float('nan'):>8.2f}x"
                     + (f"  ERROR: {r['error'][:120]}" if r["error"] else ""))
    lines.append(f"bytes held per store for one model ({nbytes / 1e9:.2f} GB checkpoint):")
    lines += [f"  {k}: {v / 1e9:.2f} GB" for k, v in held.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
