"""RL weight updates (issue 27, item 4): a trainer publishes version after version from memory and an engine
updates from the store, against the engine's own loader from a checkpoint directory, in the same run and engine.

    .venv/bin/python -m benchmarks.updates [--mb 970] [--steps 3] [--engines sglang,vllm]

A bf16 Llama of about ``--mb`` MB (transformers-written, cached in benchmarks/.data). Per engine (SGLang tp=2, vLLM
tp=2; one after the other, each with its own redis-server on loopback), one process of the engine's venv is the
trainer and drives the engine: fp32 master weights, Adam steps on random gradients (``--betas``; default 0,0:
``lr * sign(g)``, no optimizer state, as this machine's memory is shared) at a learning rate calibrated so that a
step changes about ``--changed`` of the bf16 elements (the fraction each step really changed is measured and
reported). Per step, on the same engine:

* **disk** (the engine's own loader, page cache warm: its best case): ``save_file`` of the bf16 weights into a
  checkpoint directory, then SGLang ``update_weights_from_disk(ckpt, "auto")`` / vLLM ``reload_weights`` with its
  safetensors loader reading that directory; the clock runs from ``save_file`` to the update's return;
* **today** (before deltas): ``save_file``, ``raydist_loader.publish(ckpt)`` (a whole version, of a second model
  name so the delta chain is left alone), the engine's raydist update from it;
* (untimed) the engine updates back to the delta chain's current version (a whole read: after ``today`` its
  parameters no longer serve a version of the chain);
* **delta**: ``UpdatePublisher.publish`` of the bf16 weights from memory (XOR + zstd against the version before;
  clock: the call to its return, in the trainer's process), then the engine's raydist update (SGLang
  ``update_weights_from_disk(DIR, load_format="raydist")``, vLLM ``collective_rpc("reload_weights")``; clock: the
  call to its return, every rank serving the new version).

The delta way goes last, so after the loop the engine serves weights that came through deltas; it is then compared
with the same engine after loading the final weights with its own loader from the checkpoint directory: greedy
tokens and top-5 logprobs of a few prompts. Redis' own counters (``INFO stats`` total_net_input_bytes /
total_net_output_bytes) are read before and after every publish and update. Each rank's log line ("N of M chunks
built from the weights served, X MB read from the store") is kept per update. Results:
benchmarks/results/updates.json, with the medians over the steps and the targets of issue 27.

The engine side is this module run in the engine's venv: ``python -m benchmarks.updates --engine-side SPEC OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"
VENVS = {"sglang": ROOT / ".venv-sglang" / "bin" / "python", "vllm": ROOT / ".venv-vllm" / "bin" / "python"}
MODEL = "bench-updates-llama"
TODAY = MODEL + "-today"  # today's way: whole versions of a second model, so the delta chain is left alone
TP = 2
PROMPTS = [[1, 450, 4996, 17354, 1701, 432, 17204, 975], [1, 306, 763, 304, 1207, 263, 1243, 29889, 13, 4013]]
SGLANG_CPU = {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True,
              "skip_tokenizer_init": True, "chunked_prefill_size": 256, "max_running_requests": 4, "random_seed": 0,
              "log_level": "info", "disable_radix_cache": True,
              "dtype": "bfloat16", "max_total_tokens": 512, "mem_fraction_static": 0.3}
"""SGLang's CPU path as tests/sglang_engine.py runs it, in bf16; 0.3 of the host's memory for weights and KV cache
(0.15 was refused once the trainer held its copies: SGLang sizes it against the memory free at start)."""
VLLM_ENGINE = {"enforce_eager": True, "dtype": "bfloat16", "skip_tokenizer_init": True, "max_model_len": 128,
               "max_num_seqs": 4}
UPDATE_LINE = re.compile(r"rank (\d+)/(\d+): .*?(\d+) of (\d+) chunks built from the weights served, ([\d.]+) MB read "
                         r"from the store for a ([\d.]+) MB shard")


def log(msg: str) -> None:
    print(f"[updates-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """fp32 master weights taking Adam steps on random gradients; ``served`` are the bf16 tensors it publishes.
    ``betas=(0, 0)``: Adam without memory, ``lr * g / (|g| + eps)`` = ``lr * sign(g)``, and no optimizer state
    (two fp32 copies of the model fewer)."""

    def __init__(self, state: dict[str, torch.Tensor], seed: int = 0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.master = {k: v.float().clone() for k, v in state.items()}
        self.dtype = next(iter(state.values())).dtype
        stateful = any(betas)
        self.m = {k: torch.zeros_like(v) for k, v in self.master.items()} if stateful else {}
        self.v = {k: torch.zeros_like(v) for k, v in self.master.items()} if stateful else {}
        self.betas, self.eps, self.t = betas, eps, 0
        self.gen = torch.Generator().manual_seed(seed)
        self.served = {k: v.to(self.dtype) for k, v in self.master.items()}

    def calibrate(self, target: float, samples: int = 1 << 20) -> float:
        """The learning rate at which a step of ``lr * sign(g)`` after a first such step changes about ``target``
        of the served elements (the first step from weights that are exactly bf16 changes fewer: about 2/3),
        found by bisection on a sample of the weights."""
        total = sum(w.numel() for w in self.master.values())
        gen = torch.Generator().manual_seed(1)
        picked = [w.flatten()[torch.randint(w.numel(), (max(1, samples * w.numel() // total),), generator=gen)]
                  for w in self.master.values()]
        sample = torch.cat(picked)
        first, second = (torch.randn(sample.shape, generator=gen).sign_() for _ in range(2))

        def changed(lr: float) -> float:
            before = sample + lr * first
            return float(((before + lr * second).to(self.dtype) != before.to(self.dtype)).float().mean())

        lo, hi = 1e-9, 1e-1
        for _ in range(40):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if changed(mid) < target else (lo, mid)
        return (lo * hi) ** 0.5

    def step(self, lr: float) -> float:
        """One Adam step (bias-corrected); returns the fraction of the served (bf16) elements it changed."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        changed = total = 0
        for k, w in self.master.items():
            g = torch.randn(w.shape, generator=self.gen)
            if not self.m:  # betas 0: m = g, v = g * g
                w.addcdiv_(g, g.abs().add_(self.eps), value=-lr)
            else:
                m, v = self.m[k], self.v[k]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = v.div(c2).sqrt_().add_(self.eps)
                w.addcdiv_(m, denom, value=-lr / c1)
                del denom
            del g
            new = w.to(self.dtype)
            changed += int((new != self.served[k]).sum())
            total += new.numel()
            self.served[k] = new
        return changed / total


# ------------------------------------------------------------------------------------------------ where the time goes
SITECUSTOMIZE = """# written by benchmarks/updates.py: times the raydist update's phases in the engine's processes
import importlib.abc, importlib.util, sys
class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "raydist_loader.engines.handoff":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            from benchmarks.updates import time_rank_updates
            time_rank_updates(module)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Hook())
"""


class Timers:
    """Seconds spent in wrapped functions (summed over the threads that call them), by label."""

    def __init__(self):
        import threading

        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def wrap(self, owner, name: str, label: str) -> None:
        import functools

        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        with self._lock:
            out, self.seconds = self.seconds, {}
        return out


def time_rank_updates(handoff) -> None:
    """(in an engine's rank, through SITECUSTOMIZE) Time each raydist update's phases on this rank and append
    them as one JSON line to $RAYDIST_BENCH_TIMERS: ``pull_update`` (the whole pull + rebuild + verify, wall),
    ``read_deltas`` (reading the deltas, wall), ``cold_pull`` (chunks read whole from the store, wall), and summed
    over the threads: ``rebuild`` (per chunk: copy from the parameter, apply the deltas, hash), ``apply`` (zstd
    decompress + XOR), ``hash`` (xxh3 of the rebuilt chunks)."""
    from raydist_loader.load import served, worker
    from raydist_loader.store import deltas

    timers = Timers()
    timers.wrap(served, "_read_deltas", "read_deltas")
    timers.wrap(served, "_built", "rebuild")
    timers.wrap(deltas, "apply", "apply")
    timers.wrap(worker.ShardLoader, "_pull", "cold_pull")

    class TimedHash(served.ChunkHash):
        def update(self, data):
            t0 = time.perf_counter()
            try:
                return super().update(data)
            finally:
                with timers._lock:
                    timers.seconds["hash"] = timers.seconds.get("hash", 0.0) + time.perf_counter() - t0

    served.ChunkHash = TimedHash
    inner = handoff.pull_update

    def pull_update(loader, was):
        timers.take()
        t0 = time.perf_counter()
        report = inner(loader, was)
        row = {"pid": os.getpid(), "rank": loader.rank, "version": report.version, "at": time.time(),
               "pull_update": time.perf_counter() - t0, **timers.take()}
        with open(os.environ["RAYDIST_BENCH_TIMERS"], "a") as f:
            f.write(json.dumps(row) + "\n")
        return report

    handoff.pull_update = pull_update


def time_publisher() -> Timers:
    """(in the trainer) Time UpdatePublisher.publish's phases: ``xor``, ``zstd``, ``hash`` (summed over its
    threads), ``decide`` (per tensor: XOR, zstd, hash, keep; summed over threads), ``store_write`` (wall)."""
    from raydist_loader.store import deltas, updates

    timers = Timers()
    timers.wrap(deltas, "xor", "xor")
    timers.wrap(deltas, "encode", "zstd")
    timers.wrap(updates, "_digests", "hash")
    timers.wrap(updates.UpdatePublisher, "_decide", "decide")
    timers.wrap(updates.UpdatePublisher, "_write", "store_write")
    return timers


# ------------------------------------------------------------------------------------------------ engine side
def redis_counters(url: str) -> tuple[int, int]:
    """Redis' own total_net_input_bytes, total_net_output_bytes."""
    import redis

    info = redis.Redis.from_url(url).info("stats")
    return int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"])


class Counted:
    """Seconds and the store's received/sent bytes of one block: ``with Counted(url) as c: ...``."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> Counted:
        self.before = redis_counters(self.url)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        after = redis_counters(self.url)
        self.bytes_in, self.bytes_out = after[0] - self.before[0], after[1] - self.before[1]

    def row(self, prefix: str) -> dict:
        return {f"{prefix}_s": self.seconds, f"{prefix}_store_in": self.bytes_in,
                f"{prefix}_store_out": self.bytes_out}


def session_rss() -> dict[str, float]:
    """MB resident per process of this session (the engine's processes, started from here), by name."""
    out: dict[str, float] = {}
    me = os.getsid(0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != me:
                continue
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            name = f"{fields['Name'].strip()}[{pid}]"
            out[name] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        except (OSError, KeyError, ValueError):
            continue
    return out


def reload_safetensors(worker, model_dir: str) -> None:
    """(in a vLLM worker) vLLM's in-place weight reload fed by its own safetensors loader reading ``model_dir``
    (as tests/vllm_engine.py does)."""
    import copy

    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader

    config = copy.copy(worker.model_config)
    config.model = model_dir
    weights = DefaultModelLoader(LoadConfig(load_format="safetensors")).get_all_weights(
        config, worker.model_runner.get_model()
    )
    worker.reload_weights(weights_iterator=weights)


class SGLang:
    def __init__(self, cfg: str, url: str):
        import sglang

        self.engine = sglang.Engine(**SGLANG_CPU, tp_size=TP, model_path=cfg, load_format="raydist",
                                    model_loader_extra_config=json.dumps({"url": url, "model": MODEL}))

    def _update(self, path: str, load_format: str) -> None:
        ok, message, *_ = self.engine.update_weights_from_disk(path, load_format=load_format)
        if not ok:
            raise RuntimeError(f"update_weights_from_disk({path}, {load_format}) failed: {message}")

    def raydist(self, cfg: str) -> None:
        self._update(cfg, "raydist")

    def disk(self, ckpt: str) -> None:
        self._update(ckpt, "auto")

    def generate(self) -> list[dict]:
        outs = self.engine.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 8, "temperature": 0.0},
                                    return_logprob=True, top_logprobs_num=5)
        return [{"tokens": list(o["output_ids"]),
                 "logprobs": [{str(tok): lp for lp, tok, *_ in step} for step in o["meta_info"]["output_top_logprobs"]]}
                for o in outs]

    def close(self) -> None:
        self.engine.shutdown()


class VLLM:
    def __init__(self, cfg: str, url: str):
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(model=cfg, load_format="raydist", tensor_parallel_size=TP, **VLLM_ENGINE,
                       model_loader_extra_config={"url": url, "model": MODEL})

    def raydist(self, cfg: str) -> None:
        if cfg == self.cfg:  # the engine's own directory (vLLM keeps the last reload's weights_path: set it back)
            self.llm.collective_rpc("reload_weights")
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": cfg})

    def back(self, cfg: str) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": cfg})

    def disk(self, ckpt: str) -> None:
        self.llm.collective_rpc(reload_safetensors, args=(ckpt,))

    def generate(self) -> list[dict]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [{"tokens": list(o.outputs[0].token_ids),
                 "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]}
                for o in outs]

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()


def compare(a: list[dict], b: list[dict]) -> dict:
    """Whether two generations agree: the same greedy tokens, the same top-5 tokens, the largest logprob gap."""
    tokens = all(x["tokens"] == y["tokens"] for x, y in zip(a, b, strict=True))
    top = all(set(s) == set(t) for x, y in zip(a, b, strict=True) for s, t in zip(x["logprobs"], y["logprobs"],
                                                                                   strict=True))
    gap = max((abs(s[k] - t[k]) for x, y in zip(a, b, strict=True)
               for s, t in zip(x["logprobs"], y["logprobs"], strict=True) for k in s if k in t), default=0.0)
    return {"same_tokens": tokens, "same_top5": top, "max_logprob_diff": gap, "equal": tokens and top and gap == 0}


def engine_side(spec_path: str, out_path: str) -> None:
    """The trainer and the engine (in the engine's venv): the loop of the module docstring."""
    from safetensors.torch import load_file, save_file

    import raydist_loader as rl

    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec["env"])
    url, src, work, ways = spec["url"], Path(spec["checkpoint"]), Path(spec["work"]), set(spec["ways"])
    cfg, today_cfg = work / "cfg", work / "today-cfg"
    ckpt, today_ckpt = work / "ckpt", work / "today-ckpt"
    for d in (ckpt, today_ckpt):  # the checkpoint directories: the source's config and tokenizer, then weights
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copy2(f, d / f.name)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    trainer = Trainer(state, betas=tuple(spec["betas"]))
    del state
    lr = trainer.calibrate(spec["changed"])
    log(f"trainer: {sum(w.numel() for w in trainer.master.values()) / 1e6:.0f} M parameters, lr {lr:.3g}")
    pub = rl.UpdatePublisher(url, MODEL, files_from=src, max_tp=TP, full_every=8)
    timers = time_publisher()
    with Counted(url) as c:
        first = pub.publish(trainer.served)
    result: dict = {"engine": spec["engine"], "lr": lr, "betas": spec["betas"],
                    "first_publish": {**c.row("publish"), **first.update},
                    "ways": sorted(ways), "steps": [], "raydist_updates": [], "check": None, "error": None}
    rl.pull_files(url, MODEL, cfg)
    t0 = time.perf_counter()
    engine = (SGLang if spec["engine"] == "sglang" else VLLM)(str(cfg), url)
    result["start_s"] = time.perf_counter() - t0
    log(f"{spec['engine']} started in {result['start_s']:.1f} s")
    try:
        for n in range(spec["steps"]):
            t0 = time.perf_counter()
            changed = trainer.step(lr)
            row: dict = {"step": n + 1, "changed": changed, "trainer_s": time.perf_counter() - t0}
            if "disk" in ways:  # save_file, then the engine's own loader on that directory
                t0 = time.perf_counter()
                save_file(trainer.served, str(ckpt / "model.safetensors"))
                row["disk_save_s"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                engine.disk(str(ckpt))
                row["disk_update_s"] = time.perf_counter() - t1
                row["disk_s"] = time.perf_counter() - t0
            if "today" in ways:  # save_file, publish (whole), update through raydist
                t0 = time.perf_counter()
                save_file(trainer.served, str(today_ckpt / "model.safetensors"))
                row["today_save_s"] = time.perf_counter() - t0
                with Counted(url) as c:
                    rl.publish(today_ckpt, url, TODAY, max_tp=TP)
                row |= c.row("today_publish")
                if n == 0:
                    rl.pull_files(url, TODAY, today_cfg)
                with Counted(url) as c:
                    engine.raydist(str(today_cfg))
                row |= c.row("today_update")
                row["today_s"] = row["today_save_s"] + row["today_publish_s"] + row["today_update_s"]
                # back to the delta chain's current version (untimed in the table: a whole read)
                with Counted(url) as c:
                    (engine.back if isinstance(engine, VLLM) else engine.raydist)(str(cfg))
                row |= c.row("back")
                result["raydist_updates"] += ["today", "back"]
            # delta: publish from memory, the engine's raydist update
            timers.take()
            with Counted(url) as c:
                published = pub.publish(trainer.served)
            row |= c.row("publish") | {"update_kind": published.update, "version": published.version,
                                       "publish_phases": timers.take()}
            with Counted(url) as c:
                engine.raydist(str(cfg))
            row |= c.row("update")
            row["delta_s"] = row["publish_s"] + row["update_s"]
            row["rss_mb"] = session_rss()  # after the update: does a process keep growing?
            result["raydist_updates"].append("update")
            if "disk" not in ways:  # the final check reads the last weights from the checkpoint directory
                save_file(trainer.served, str(ckpt / "model.safetensors"))
            result["steps"].append(row)
            big = sorted(row["rss_mb"].items(), key=lambda kv: -kv[1])[:4]
            log("rss MB: " + ", ".join(f"{k} {v:.0f}" for k, v in big))
            log(f"step {n + 1}: changed {changed:.2%}; delta {row['publish_s']:.2f} + {row['update_s']:.2f} s "
                f"(store in {row['publish_store_in'] / 1e6:.0f} MB, out {row['update_store_out'] / 1e6:.0f} MB); "
                f"disk {row.get('disk_s', float('nan')):.2f} s; today {row.get('today_s', float('nan')):.2f} s")
            try:
                if "today" in ways:
                    rl.gc(url, TODAY, grace_s=0)  # the store keeps today's current version only
            except Exception as e:  # noqa: BLE001 - memory only; the run goes on
                log(f"gc of {TODAY}: {type(e).__name__}: {e}")
            Path(out_path).write_text(json.dumps(result))
        updated = engine.generate()  # the weights that came through deltas
        engine.disk(str(ckpt))  # the same weights (the last step's), through the engine's own loader
        reference = engine.generate()
        result["check"] = {"updated": updated, "reference": reference, **compare(updated, reference)}
        log(f"check: {json.dumps({k: v for k, v in result['check'].items() if k not in ('updated', 'reference')})}")
    except Exception:  # noqa: BLE001
        import traceback

        result["error"] = traceback.format_exc()
        log(result["error"])
    finally:
        engine.close()
    Path(out_path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def update_lines(text: str) -> list[list[dict]]:
    """The raydist updates in one engine's log, in order: per update, each rank's "N of M chunks built from the
    weights served, X MB read" (ranks of one update are consecutive lines)."""
    updates: list[list[dict]] = []
    for rank, tp, reused, chunks, read_mb, shard_mb in UPDATE_LINE.findall(text):
        line = {"rank": int(rank), "reused": int(reused), "chunks": int(chunks), "read_mb": float(read_mb),
                "shard_mb": float(shard_mb)}
        if not updates or len(updates[-1]) == int(tp) or any(r["rank"] == line["rank"] for r in updates[-1]):
            updates.append([])
        updates[-1].append(line)
    return updates


def attach_lines(result: dict, lines: list[list[dict]]) -> None:
    """Each rank's line of each raydist update, onto its step (the engine side lists the updates in order)."""
    labels, steps = result.get("raydist_updates", []), iter(result.get("steps", []))
    row = None
    for label, ranks in zip(labels, lines, strict=False):
        if label == labels[0] or row is None:
            row = next(steps, None)
        if row is not None:
            row[f"{label}_ranks"] = ranks


def attach_timers(result: dict, path: Path) -> None:
    """Each rank's update phases (time_rank_updates) onto the step whose version it pulled."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for step in result.get("steps", []):  # the first pull of the step's version (the next step's "back" is later)
        first: dict[int, dict] = {}
        for r in sorted((r for r in rows if r["version"] == step.get("version")), key=lambda r: r["at"]):
            first.setdefault(r["rank"], r)
        step["update_phases"] = [first[k] for k in sorted(first)]


def summary(result: dict, model_bytes: int) -> dict:
    """Medians over the steps, and the targets of issue 27 for one engine."""
    steps = result.get("steps", [])
    if not steps:
        return {}
    keys = ("changed", "trainer_s", "publish_s", "update_s", "delta_s", "disk_save_s", "disk_update_s", "disk_s",
            "today_save_s", "today_publish_s", "today_update_s", "today_s", "publish_store_in", "publish_store_out",
            "update_store_in", "update_store_out", "today_publish_store_in", "today_update_store_out")
    med = {k: statistics.median(s[k] for s in steps) for k in keys if all(k in s for s in steps)}
    read = [sum(r["read_mb"] for r in s.get("update_ranks", [])) * 1e6 for s in steps]
    med["engine_read_bytes"] = statistics.median(read)  # the ranks' own count ("MB read from the store")
    med["reused_chunks"] = statistics.median(sum(r["reused"] for r in s.get("update_ranks", [])) for s in steps)
    med["chunks"] = statistics.median(sum(r["chunks"] for r in s.get("update_ranks", [])) for s in steps)
    phases = {}
    for key in ("xor", "zstd", "hash", "decide", "store_write"):
        phases[f"publish_{key}_s"] = statistics.median(s.get("publish_phases", {}).get(key, 0.0) for s in steps)
    for key in ("pull_update", "read_deltas", "cold_pull", "rebuild", "apply", "hash"):  # the slowest rank
        phases[f"rank_{key}_s"] = statistics.median(max((r.get(key, 0.0) for r in s.get("update_phases", [])),
                                                        default=0.0) for s in steps)
    phases["engine_rest_s"] = med["update_s"] - phases["rank_pull_update_s"]  # agreement, the engine's own copy
    med["phases"] = phases
    med["written_x_model"] = med["publish_store_in"] / model_bytes
    med["read_x_model"] = med["update_store_out"] / model_bytes
    check = result.get("check") or {}
    targets = [] if "disk_s" not in med else [
        {"what": "publish + update <= 0.5x disk save + update", "measured": med["delta_s"] / med["disk_s"],
         "limit": 0.5, "met": med["delta_s"] <= 0.5 * med["disk_s"]}]
    targets += [
        {"what": "bytes written per update <= 0.25x the model", "measured": med["written_x_model"], "limit": 0.25,
         "met": med["written_x_model"] <= 0.25, "changed": med["changed"]},
        {"what": "bytes read per update <= 0.25x the model", "measured": med["read_x_model"], "limit": 0.25,
         "met": med["read_x_model"] <= 0.25, "changed": med["changed"]},
        {"what": "updated engine's tokens and top-5 logprobs == the same engine loaded with the final weights",
         "measured": check.get("max_logprob_diff"), "met": bool(check.get("equal"))},
    ]
    return {"medians": med, "targets": targets, "steps": len(steps)}


def fp8_probe(rows: int = 4096, cols: int = 8192, bf16_changed: float = 0.05, seed: int = 0) -> dict:
    """(paper estimate) What one step changes in FP8 weights: a [rows, cols] fp32 master (std 0.02, as the
    benchmark's Llama) is quantized as DeepSeek-V3 / Kimi-K2 checkpoints are (float8_e4m3fn, one fp32 scale per
    128 x 128 block, amax / 448); one Adam first step (``lr * sign(g)``) at the learning rate that changes
    ``bf16_changed`` of the bf16 elements; measured: the fraction of FP8 bytes and of bf16 elements that changed,
    and the bytes of the stored deltas (the product's ``zstd(new XOR old)``) per model byte, for both."""
    from raydist_loader.store import deltas

    gen = torch.Generator().manual_seed(seed)
    master = torch.randn(rows, cols, generator=gen) * 0.02
    trainer = Trainer({"w": master.to(torch.bfloat16)})
    trainer.master["w"] = master
    lr = trainer.calibrate(bf16_changed)
    stepped = master + lr * torch.randn(master.shape, generator=gen).sign_()

    def fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = w.reshape(rows // 128, 128, cols // 128, 128)
        scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / 448.0
        return (blocks / scale).to(torch.float8_e4m3fn).reshape(rows, cols), scale.flatten()

    def stored(old: torch.Tensor, new: torch.Tensor) -> int:
        a, b = (t.contiguous().view(torch.uint8).flatten().numpy() for t in (old, new))
        return len(deltas.encode(deltas.xor(b, a)))

    (q0, s0), (q1, s1) = fp8(master), fp8(stepped)
    b0, b1 = master.to(torch.bfloat16), stepped.to(torch.bfloat16)
    t0 = time.perf_counter()
    fp8_delta = stored(q0, q1) + stored(s0, s1)
    seconds = time.perf_counter() - t0
    return {"lr": lr, "elements": rows * cols,
            "bf16_changed": float((b0 != b1).float().mean()), "bf16_delta_x_model": stored(b0, b1) / b0.nbytes / 1,
            "fp8_changed": float((q0.view(torch.uint8) != q1.view(torch.uint8)).float().mean()),
            "fp8_scales_changed": float((s0 != s1).float().mean()),
            "fp8_delta_x_model": fp8_delta / (q0.numel() + 4 * s0.numel()),
            "xor_zstd_gbps_one_core": q0.numel() / seconds / 1e9}


def paper_estimate(delta_x_model: float = 0.02) -> dict:
    """The loop for a 1T-parameter FP8 MoE from 256 trainer GPUs into 16 engines at tp=16 from a Redis Cluster, on
    paper (docs/performance.md, "RL weight updates"). Every input is here; ``delta_x_model``: stored delta bytes
    per model byte and step (:func:`fp8_probe` measures 1.3% at the learning rate that changes 5% of bf16
    elements; 2% leaves a margin). Cases: the product as it is (every trainer rank publishes its part of the
    version as deltas, ``UpdatePublisher.publish(token=, part=)``; each engine rank copies its GPU parameters to the
    host, applies the deltas and hashes there, then the engine copies the shard back in); the same with the deltas
    applied and hashed on the GPU (not in the product); and with one publisher process for the whole model."""
    p = {"model_bytes": 1.0e12, "delta_x_model": delta_x_model, "trainer_gpus": 256, "trainer_nodes": 32,
         "engines": 16, "tp": 16, "engine_nodes": 32, "redis_masters": 32, "master_out_gbps": 4.0,
         "master_in_gbps": 3.0, "node_nic_gbps": 25.0, "pcie_gbps": 25.0, "host_mem_gbps": 300.0,
         "zstd_core_gbps": 0.8, "apply_core_gbps": 1.5, "cores_per_gpu": 8, "gpu_rebuild_gbps": 200.0,
         "checkpoint_engine_s": 16.0}
    g = 1e9
    model, delta = p["model_bytes"], p["model_bytes"] * delta_x_model
    shard = model / p["tp"]
    cluster_out = p["redis_masters"] * p["master_out_gbps"] * g
    cluster_in = p["redis_masters"] * p["master_in_gbps"] * g
    # publish: each trainer rank XORs + compresses its 1/256 (after a D2H copy) and writes its deltas
    part = model / p["trainer_gpus"]
    parts_publish = (part / (p["pcie_gbps"] * g) + part / (p["zstd_core_gbps"] * p["cores_per_gpu"] * g)
                     + delta / cluster_in)
    # one publisher process: the 1 TB gathered to one host, XOR + zstd on 64 cores
    one_publish = model / (p["node_nic_gbps"] * g) + model / (p["zstd_core_gbps"] * 64 * g) + delta / cluster_in
    # read: every engine reads every delta once (each rank its shard's), from the cluster and through the NICs
    per_node = (p["engines"] * delta) / p["engine_nodes"]
    read = max(p["engines"] * delta / cluster_out, per_node / (p["node_nic_gbps"] * g))
    whole_read = max(p["engines"] * model / cluster_out,
                     p["engines"] * model / p["engine_nodes"] / (p["node_nic_gbps"] * g))
    # rebuild on the host: D2H then H2D of the shard over PCIe, zstd decompress + XOR on the rank's cores, ~5 passes
    # of host memory per byte (D2H write, decompress + XOR, hash, H2D read) for the node's 8 ranks: the slowest
    host_rebuild = max(2 * shard / (p["pcie_gbps"] * g), shard / (p["apply_core_gbps"] * p["cores_per_gpu"] * g),
                       8 * shard * 5 / (p["host_mem_gbps"] * g))
    gpu_rebuild = delta / p["tp"] / (p["pcie_gbps"] * g) + 2 * shard / (p["gpu_rebuild_gbps"] * g)
    cases = {
        "as it is: parts, rebuilt on the host": {"publish_s": parts_publish, "read_s": read, "rebuild_s": host_rebuild},
        "parts, rebuilt on the GPU (not in the product)": {"publish_s": parts_publish, "read_s": read,
                                                           "rebuild_s": gpu_rebuild},
        "one publisher process, rebuilt on the host": {"publish_s": one_publish, "read_s": read,
                                                       "rebuild_s": host_rebuild},
        "no deltas: every rank reads its whole shard": {"publish_s": part / (p["pcie_gbps"] * g) + model / cluster_in,
                                                        "read_s": whole_read,
                                                        "rebuild_s": shard / (p["pcie_gbps"] * g)},
    }
    for c in cases.values():
        c["total_s"] = c["publish_s"] + c["read_s"] + c["rebuild_s"]
    return {"inputs": p, "delta_bytes": delta, "shard_bytes": shard, "cases": cases}


def render(summaries: dict, model_bytes: int) -> str:
    lines = [f"model {model_bytes / 1e9:.2f} GB bf16; medians over the steps"]
    for engine, s in summaries.items():
        if not s:
            lines.append(f"{engine}: no steps")
            continue
        m = s["medians"]
        nan = float("nan")
        lines.append(f"{engine} tp={TP}: changed {m['changed']:.2%}; delta publish {m['publish_s']:.2f} s + update "
                     f"{m['update_s']:.2f} s = {m['delta_s']:.2f} s; disk save {m.get('disk_save_s', nan):.2f} + "
                     f"update {m.get('disk_update_s', nan):.2f} = {m.get('disk_s', nan):.2f} s; today "
                     f"{m.get('today_save_s', nan):.2f} + {m.get('today_publish_s', nan):.2f} + "
                     f"{m.get('today_update_s', nan):.2f} = {m.get('today_s', nan):.2f} s; store in "
                     f"{m['written_x_model']:.3f}x model, out {m['read_x_model']:.3f}x model; chunks built from the "
                     f"served weights {m['reused_chunks']:.0f} of {m['chunks']:.0f}")
        lines.append("  phases (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in m["phases"].items()))
        lines += [f"  {'MET ' if t['met'] else 'MISS'} {t['what']}: {t['measured']}" for t in s["targets"]]
    return "\n".join(lines)


def run_engine(engine: str, ckpt: Path, args: argparse.Namespace) -> dict:
    from .servers import start_redis

    redis = start_redis()
    work = Path(tempfile.mkdtemp(prefix=f"updates-{engine}-", dir=DATA))
    spec, out, engine_log = work / "spec.json", work / "out.json", work / "engine.log"
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "SGLANG_USE_CPU_ENGINE": "1"} if engine == "sglang" else {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    spec.write_text(json.dumps({"engine": engine, "url": f"redis://127.0.0.1:{redis.port}/0",
                                "checkpoint": str(ckpt), "work": str(work), "steps": args.steps,
                                "changed": args.changed, "betas": args.betas, "ways": args.ways.split(","),
                                "env": env}))
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    rank_timers = work / "rank-timers.jsonl"
    penv = {**os.environ, **env, "RAYDIST_BENCH_TIMERS": str(rank_timers),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")]))}
    log(f"{engine}: starting (log {engine_log})")
    t0 = time.time()
    try:
        with open(engine_log, "wb") as f:
            proc = subprocess.Popen([str(VENVS[engine]), "-m", "benchmarks.updates", "--engine-side", str(spec),
                                     str(out)], stdout=f, stderr=subprocess.STDOUT, env=penv, cwd=ROOT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=args.timeout)
            finally:  # an engine side that died (OOM) leaves the engine's processes: end its session's
                import signal

                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                    time.sleep(5)
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = engine_log.read_text(errors="replace")
        result = json.loads(out.read_text()) if out.exists() else {"error": f"no result:\n{text[-3000:]}"}
        attach_lines(result, update_lines(text))
        attach_timers(result, rank_timers)
        result["engine_log_tail"] = text[-3000:] if result.get("error") else None
        if args.keep_logs:
            shutil.copy2(engine_log, args.out.with_name(f"updates-{engine}.log"))
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {args.timeout} s"}
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    log(f"{engine}: done in {time.time() - t0:.0f} s" + (f"; ERROR {result['error'][-500:]}"
                                                         if result.get("error") else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=970, help="checkpoint size in MB (default 970)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per engine (default 3; medians reported)")
    ap.add_argument("--engines", default="sglang,vllm", help="comma-separated: sglang, vllm (default both)")
    ap.add_argument("--changed", type=float, default=0.045,
                    help="fraction of bf16 elements a step changes, to calibrate the lr (default 0.045)")
    ap.add_argument("--betas", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 0.0],
                    help="the trainer's Adam betas (default 0,0: lr * sign(g), no optimizer state, for a small "
                         "machine; 0.9,0.999 keeps m and v: two more fp32 copies of the model)")
    ap.add_argument("--ways", default="disk,today,delta",
                    help="what each step runs besides delta (always): disk, today (default disk,today,delta)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per engine run")
    ap.add_argument("--keep-logs", action="store_true", help="copy each engine's log next to --out")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "updates.json")
    ap.add_argument("--engine-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_side:
        engine_side(*args.engine_side)
        return 0
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in VENVS]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}: choose from {sorted(VENVS)}")
    missing = [str(VENVS[e]) for e in engines if not VENVS[e].exists()]
    if missing:
        raise SystemExit(f"{missing} missing: run `bash benchmarks/run.sh updates` (it sets up the engines' venvs)")
    from .sglang_load import checkpoint  # the same 0.98 GB bf16 Llama as the SGLang rows (one cached copy)

    ckpt = checkpoint(args.mb)
    model_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {e: {**run_engine(e, ckpt, args), "at": time.strftime("%Y-%m-%d %H:%M:%S")} for e in engines}
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    if kept.get("checkpoint_bytes") == model_bytes:  # engines not run this time keep their last results
        earlier = kept.get("engines", {})
        results = {e: r for e, r in earlier.items() if e not in results and not r.get("error")} | results
    summaries = {e: summary(r, model_bytes) for e, r in results.items()}
    probe = fp8_probe()
    log(f"fp8 probe: {probe}")
    print(render(summaries, model_bytes))
    machine = {"cpus": os.cpu_count(), "note": "shared 2-core VM: other jobs ran at the same time; one run"}
    args.out.write_text(json.dumps({"checkpoint_bytes": model_bytes, "tp": TP, "machine": machine,
                                    "summary": summaries, "engines": results, "fp8_probe": probe,
                                    "paper": paper_estimate()},
                                   indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if all(not r.get("error") for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
