"""Runs vLLM engines for tests/test_vllm.py (and benchmarks/vllm_load.py) inside the vLLM venv.

    .venv-vllm/bin/python tests/vllm_engine.py SPEC.json OUT.json

SPEC: ``{"runs": [RUN, ...]}``, run one after another in this process (one engine each). A RUN: ``name``; ``env``
(set before the engine starts: its processes inherit it); ``llm`` (keyword arguments of ``vllm.LLM``); ``prompts``
(token id lists: greedy tokens and top-5 logprobs are recorded); ``digests``: a list of ``{"label", "load_format",
"extra", "model"}``: in every worker, a fresh copy of the model is built and loaded with that load format
(``model``: the directory the safetensors loader reads), and a sha256 of every parameter is taken BEFORE vLLM's
kernel post-processing (which, on CPU, packs the linear weights and drops the originals, so
``compute_weight_checksums`` of a running engine would not see them); ``digests_failing``: the same, expected to
fail (the error text is recorded); ``reloads``: ``{"label", "model"}``: vLLM's ``reload_weights`` with its
safetensors loader from that checkpoint directory (``weights_path``: vLLM's ``reload_weights(weights_path=DIR)``
with the engine's own load format; neither: the engine's own load format as started), then the prompts again;
``reports``: collect every worker's ``model.raydist_report``; ``timed`` (entries as ``digests``) and ``rounds``:
that many rounds, in alternating order, of a fresh load per entry, timing ``load_weights`` (benchmarks); ``memory``:
then one more load per entry, untimed, into a model whose parameters were written first, recording how much host
memory the loader itself took at most (``peak_hwm``, ``peak_anon``: the worker that grew most). ``race`` (a run's,
or a reload's): ``{"hold", "publish": {"ckpt", "url", "model", "max_tp"}}``: while the engine starts (or reloads), a
thread waits until a rank is held at its first manifest read (``faulty+...?hold=DIR``,
:mod:`raydist_loader.testing.hold`), publishes that checkpoint as a new version, then releases the rank (a publish
landing between two ranks' reads, deterministically); a raced reload also records every worker's report after it
(``reload_reports``). A reload's ``publish_update`` (``tests/rl_steps.py``) first publishes a checkpoint from memory
through a kept ``UpdatePublisher`` (``published``: its version and what it stored; ``reload_reports`` after it);
``may_fail``: a reload expected to fail (``reload_errors``: its message). A run whose engine fails to start records
the error instead (the log has the root cause).
OUT: ``{name: {"outputs", "reloads", "digests", "digests_failing", "reports", "reload_reports", "races", "load_s",
"published", "reload_errors", "error"}}``.
vLLM spawns processes, so the body is guarded by ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

from raydist_loader.testing.hold import PublishWhenHeld


class HostPeak:
    """(in a worker) How much this process's host memory grows at most while a block runs, above what it held
    when the block began: ``hwm`` from the kernel's high-water mark (reset through /proc/self/clear_refs; counts
    file pages a loader maps too), ``anon`` from RssAnon sampled every millisecond (heap and staging only)."""

    def __enter__(self) -> HostPeak:
        import threading

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.base_rss, self.base_anon = _status("VmRSS"), _status("RssAnon")
        self.peak_anon, self._stop = self.base_anon, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_anon = max(self.peak_anon, _status("RssAnon"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _status("RssAnon"))
        self.hwm = _status("VmHWM") - self.base_rss
        self.anon = self.peak_anon - self.base_anon


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def fresh_load(worker, load_format: str, extra: dict, model_dir: str | None, tag: str, hashes: bool,
               memory: bool = False) -> dict:
    """(in a worker) Build another instance of the served model and load it with ``load_format`` (``model_dir``:
    the directory the safetensors/Run:ai loaders read). Returns the seconds ``load_weights`` took, with ``memory``
    (the parameters written before, so their pages do not count) the host memory it grew by at most
    (:class:`HostPeak`: ``peak_hwm``, ``peak_anon`` bytes) and, with
    ``hashes``, a sha256 of every parameter as loaded (before post-processing), keyed as vLLM's weight checksums:
    ``dp0:pp{p}:pcp0:tp{t}:<param>``."""
    import contextlib
    import copy

    import torch
    from vllm.config import set_current_vllm_config
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.weight_checksum import compute_tensor_digests
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = copy.copy(worker.model_config)
    if model_dir:
        config.model = model_dir
    loader = get_model_loader(LoadConfig(load_format=load_format, model_loader_extra_config=extra))
    context = worker.vllm_config.compilation_config.static_forward_context
    before = set(context)
    try:
        with set_current_vllm_config(worker.vllm_config), set_default_torch_dtype(config.dtype):
            with torch.device("cpu"):
                model = loader.create_model(vllm_config=worker.vllm_config, model_config=config, prefix=tag)
            gc.collect()
            if memory:  # the parameters' pages committed first: what grows is the loader's own host memory
                for p in model.parameters():
                    p.data.zero_()
            with HostPeak() if memory else contextlib.nullcontext() as peak:
                t0 = time.perf_counter()
                loader.load_weights(model, config)
                seconds = time.perf_counter() - t0
        prefix = worker._weight_checksum_prefix()
        digests = {prefix + n: d for n, d in compute_tensor_digests(model).items()} if hashes else None
        out = {"seconds": seconds, "digests": digests}
        if peak is not None:
            out |= {"peak_hwm": peak.hwm, "peak_anon": peak.anon}
        return out
    finally:
        for key in set(context) - before:  # the copy's attention layers registered themselves under ``tag``
            del context[key]


def reload_safetensors(worker, model_dir: str) -> None:
    """(in a worker) vLLM's in-place weight reload (the RL weight-update path, which redoes the kernel
    post-processing) fed by vLLM's own safetensors loader reading ``model_dir``."""
    import copy

    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader

    config = copy.copy(worker.model_config)
    config.model = model_dir
    weights = DefaultModelLoader(LoadConfig(load_format="safetensors")).get_all_weights(
        config, worker.model_runner.get_model()
    )
    worker.reload_weights(weights_iterator=weights)


def raydist_report(worker) -> dict | None:
    """(in a worker) The rank's load report the raydist loader left on the model, as a dict."""
    import dataclasses

    report = getattr(worker.model_runner.get_model(), "raydist_report", None)
    return dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report


def generate(llm, prompts: list[list[int]]) -> list[dict]:
    """Greedy, 8 tokens, top-5 logprobs per step."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        {
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs],
        }
        for o in outs
    ]


def fresh_loads(llm, tag: str, d: dict, hashes: bool, memory: bool = False) -> list[dict]:
    """``fresh_load`` in every worker; one result per worker."""
    args = (d["load_format"], d.get("extra", {}), d.get("model"), tag, hashes, memory)
    return llm.collective_rpc(fresh_load, args=args)


def all_digests(llm, i: int, d: dict) -> dict[str, str]:
    return {k: v for part in fresh_loads(llm, f"check{i}", d, True) for k, v in part["digests"].items()}


def exercise(llm, spec: dict, result: dict) -> None:
    """Everything a run asks of a started engine, into ``result``."""
    if spec.get("prompts"):
        result["outputs"] = generate(llm, spec["prompts"])
    for i, d in enumerate(spec.get("digests", [])):
        result["digests"][d["label"]] = all_digests(llm, i, d)
    if spec.get("reports"):
        result["reports"] = llm.collective_rpc(raydist_report)
    for r in spec.get("reloads", []):
        race = PublishWhenHeld(r["race"]) if r.get("race") else None
        if r.get("publish_update"):  # an RL trainer's step from memory first (tests/rl_steps.py)
            from rl_steps import publish_update  # tests/ is this script's directory

            result["published"][r["label"]] = publish_update(r["publish_update"])
        try:
            if r.get("model"):
                llm.collective_rpc(reload_safetensors, args=(r["model"],))
            elif r.get("weights_path"):  # raydist from another directory (its raydist.json: store, model, version)
                llm.collective_rpc("reload_weights", kwargs={"weights_path": r["weights_path"]})
            else:  # the engine's own load format (raydist: its get_all_weights)
                llm.collective_rpc("reload_weights")
        except Exception as e:  # noqa: BLE001 - only where the spec expects it (the test reads the message)
            if not r.get("may_fail"):
                raise
            result["reload_errors"][r["label"]] = str(e)
        if race is not None:
            result["races"][r["label"]] = race.done()
        if race is not None or r.get("publish_update"):
            result["reload_reports"][r["label"]] = llm.collective_rpc(raydist_report)
        result["reloads"][r["label"]] = generate(llm, spec["prompts"])
    for n in range(spec.get("rounds", 0)):  # interleaved; the slowest worker's time (the TP group waits for it)
        for i, d in enumerate(spec["timed"][:: 1 if n % 2 == 0 else -1]):
            seconds = max(r["seconds"] for r in fresh_loads(llm, f"timed{n}x{i}", d, False))
            result["load_s"].setdefault(d["label"], []).append(seconds)
    for i, d in enumerate(spec.get("timed", []) if spec.get("memory") else []):  # untimed: the worker grown most
        loads = fresh_loads(llm, f"memory{i}", d, False, True)
        for key in ("peak_hwm", "peak_anon"):
            result.setdefault(key, {})[d["label"]] = [max(r[key] for r in loads)]
    # last: with several workers, a failed collective_rpc can leave the other workers' replies queued
    for i, d in enumerate(spec.get("digests_failing", [])):
        try:
            all_digests(llm, 100 + i, d)
            result["digests_failing"][d["label"]] = None
        except Exception as e:  # noqa: BLE001 - expected: the test reads the message
            result["digests_failing"][d["label"]] = str(e)


def run(spec: dict) -> dict:
    from vllm import LLM

    result: dict = {"outputs": None, "reloads": {}, "digests": {}, "digests_failing": {}, "reports": None,
                    "published": {}, "reload_errors": {},
                    "reload_reports": {}, "races": {}, "load_s": {}, "error": None}
    os.environ.update(spec.get("env", {}))
    race = PublishWhenHeld(spec["race"]) if spec.get("race") else None
    try:
        llm = LLM(**spec["llm"])
    except Exception as e:  # noqa: BLE001 - the test asserts on it (and on the log)
        result["error"] = f"{type(e).__name__}: {e}"
        return result
    finally:
        if race is not None:
            result["races"]["start"] = race.done()
    try:
        exercise(llm, spec, result)
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    finally:
        del llm
        gc.collect()
    return result


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with the functions above
    results = {}
    for one in spec["runs"]:
        t0 = time.perf_counter()
        results[one["name"]] = run(one)
        results[one["name"]]["engine_s"] = time.perf_counter() - t0
        print(f"[vllm_engine] {one['name']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        with open(out_path, "w") as f:  # after every run: a later crash keeps the earlier results
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
