"""Runs vLLM engines for tests/test_vllm.py (and benchmarks/vllm_load.py) inside the vLLM venv.

    .venv-vllm/bin/python tests/vllm_engine.py SPEC.json OUT.json

SPEC: ``{"runs": [RUN, ...]}``, run one after another in this process (one engine each). A RUN:
``name``; ``env`` (set before the engine starts: its processes inherit it); ``llm`` (keyword arguments of
``vllm.LLM``); ``prompts`` (token id lists: greedy tokens and top-5 logprobs are recorded); ``digests``: a list of
``{"label", "load_format", "extra", "model"}``: in every worker, a fresh copy of the model is built and loaded
with that load format (``model``: the directory the safetensors loader reads), and a sha256 of every parameter
is taken BEFORE vLLM's kernel post-processing (which, on CPU, packs the linear weights and drops the originals, so
``compute_weight_checksums`` of a running engine would not see them); ``digests_failing``: the same, expected to
fail (the error text is recorded); ``reloads``: ``{"label", "model"}``: vLLM's ``reload_weights`` with its
safetensors loader from that checkpoint directory, then the prompts again; ``reports``: collect every worker's
``model.raydist_report``; ``timed_reloads``: N times, time ``load_weights`` into the engine's model in every
worker (benchmarks). A run whose engine fails to start records the error instead (the log has the root cause).
OUT: ``{name: {"outputs", "reloads", "digests", "digests_failing", "reports", "load_s", "error"}}``.
vLLM spawns processes, so the body is guarded by ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def fresh_digests(worker, load_format: str, extra: dict, model_dir: str | None, tag: str) -> dict[str, str]:
    """(in a worker) Build another instance of the served model, load it with ``load_format``, hash every
    parameter as loaded (before post-processing). Keys as vLLM's weight checksums: ``dp0:pp{p}:pcp0:tp{t}:name``."""
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
            loader.load_weights(model, config)
        prefix = worker._weight_checksum_prefix()
        return {prefix + name: digest for name, digest in compute_tensor_digests(model).items()}
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
    worker.model_runner.reload_weights(weights_iterator=weights)


def timed_load(worker) -> float:
    """(in a worker) Seconds ``load_weights`` takes with the engine's own load format into its model."""
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(worker.vllm_config.load_config)
    t0 = time.perf_counter()
    loader.load_weights(worker.model_runner.get_model(), worker.model_config)
    return time.perf_counter() - t0


def raydist_report(worker) -> dict | None:
    return getattr(worker.model_runner.get_model(), "raydist_report", None)


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


def all_digests(llm, i: int, d: dict) -> dict[str, str]:
    merged: dict[str, str] = {}
    args = (d["load_format"], d.get("extra", {}), d.get("model"), f"check{i}")
    for part in llm.collective_rpc(fresh_digests, args=args):
        merged.update(part)
    return merged


def exercise(llm, spec: dict, result: dict) -> None:
    """Everything a run asks of a started engine, into ``result``."""
    if spec.get("prompts"):
        result["outputs"] = generate(llm, spec["prompts"])
    for i, d in enumerate(spec.get("digests", [])):
        result["digests"][d["label"]] = all_digests(llm, i, d)
    for i, d in enumerate(spec.get("digests_failing", [])):
        try:
            all_digests(llm, 100 + i, d)
            result["digests_failing"][d["label"]] = None
        except Exception as e:  # noqa: BLE001 - expected: the test reads the message
            result["digests_failing"][d["label"]] = str(e)
    if spec.get("reports"):
        result["reports"] = llm.collective_rpc(raydist_report)
    for r in spec.get("reloads", []):
        llm.collective_rpc(reload_safetensors, args=(r["model"],))
        result["reloads"][r["label"]] = generate(llm, spec["prompts"])
    for _ in range(spec.get("timed_reloads", 0)):
        result["load_s"].append(max(llm.collective_rpc(timed_load)))


def run(spec: dict) -> dict:
    from vllm import LLM

    result: dict = {"outputs": None, "reloads": {}, "digests": {}, "digests_failing": {}, "reports": None,
                    "load_s": [], "error": None}
    os.environ.update(spec.get("env", {}))
    try:
        llm = LLM(**spec["llm"])
    except Exception as e:  # noqa: BLE001 - the test asserts on it (and on the log)
        result["error"] = f"{type(e).__name__}: {e}"
        return result
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
