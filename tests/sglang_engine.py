"""Runs SGLang engines for tests/test_sglang.py (and benchmarks/sglang_load.py) inside the SGLang venv.

    .venv-sglang/bin/python tests/sglang_engine.py SPEC.json OUT.json

SPEC: ``{"runs": [RUN, ...]}``, run one after another in this process (one engine each). A RUN: ``name``; ``env``
(set before the engine starts: its processes inherit it); ``engine`` (keyword arguments of ``sglang.Engine``, on top
of :data:`CPU`); ``prompts`` (token id lists: greedy tokens and top-5 logprobs are recorded); ``steps``, in order:
``{"label", "publish": {"ckpt", "url", "model", "max_tp"}}`` publishes a checkpoint (a new version of the model),
``"corrupt": {"url", "model", "tensor", "chunk"}`` then flips one byte of that chunk in the store;
``{"label", "update": {"model_path", "load_format"}}`` is SGLang's ``update_weights_from_disk``, then the prompts
again; ``{"label", "publish_update": {"ckpt", "url", "model", "max_tp"[, "corrupt"]}}`` publishes a checkpoint
from memory through a kept ``UpdatePublisher`` (``tests/rl_steps.py``; its message: the version and what it stored);
``{"label", "save_remote": URL}`` is ``Engine.save_remote_model(url=URL)``. ``race`` (a run's, or an update
step's): ``{"hold", "publish": {...}}``: a publish lands while one rank is held at its first manifest read
(:class:`raydist_loader.testing.hold.PublishWhenHeld`); what happened is in ``races`` (``start`` or the step's
label). ``weight_versions``: SGLang's ``meta_info["weight_version"]`` of each first output. A run whose engine fails
to start records the error instead (the log has the root cause); ``start_s`` is the seconds ``sglang.Engine(...)``
took.
OUT: ``{name: {"outputs", "steps": {label: {"ok", "message", "outputs"}}, "races", "weight_versions", "start_s",
"error"}}``.
SGLang spawns processes, and SIGKILLs its parent when a child fails at start-up: run this in a subprocess, and keep
the body under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from raydist_loader.testing.hold import PublishWhenHeld

CPU = {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True, "skip_tokenizer_init": True,
       "dtype": "float32", "mem_fraction_static": 0.5, "max_total_tokens": 2048, "chunked_prefill_size": 256,
       "max_running_requests": 4, "random_seed": 0, "log_level": "info", "disable_radix_cache": True}
"""The Engine arguments SGLang's CPU path runs with here (see scripts/sglang_cpu/README.md). The KV cache is
``max_total_tokens``; ``mem_fraction_static`` only bounds how much the machine's free memory may drop while the
weights load (SGLang measures it before and after, and refuses to start when it dropped by more than that
fraction: a vLLM engine starting beside it, as in the test suite, took 12% at 0.05). No prefix cache: a
prompt computed again after a failed update (which keeps the cache) must take the same path as after a successful
one (which flushes it), so that equal weights give equal logprobs."""


LAST_META: list[dict] = []  # meta_info of the last generate's outputs


def generate(engine, prompts: list[list[int]]) -> list[dict]:
    """Greedy, 8 tokens, top-5 logprobs per step (``[[logprob, token id], ...]``)."""
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 8, "temperature": 0.0},
                           return_logprob=True, top_logprobs_num=5)
    LAST_META[:] = [o["meta_info"] for o in outs]
    return [{"tokens": list(o["output_ids"]),
             "logprobs": [[[lp, tok] for lp, tok, *_ in step] for step in o["meta_info"]["output_top_logprobs"]]}
            for o in outs]


def step(engine, spec: dict, one: dict, races: dict) -> dict:
    """One step of a run (see the module docstring)."""
    if "publish" in one:
        import raydist_loader as rl

        p = one["publish"]
        version = rl.publish(p["ckpt"], p["url"], p["model"], max_tp=p["max_tp"]).version
        if "corrupt" in one:
            from tests.shards import flip_one_byte

            c = one["corrupt"]
            flip_one_byte(c["url"], c["model"], c["tensor"], c["chunk"])
        return {"ok": True, "message": version, "outputs": None}
    if "publish_update" in one:  # an RL trainer's step from memory (tests/rl_steps.py): deltas of its last one
        from rl_steps import publish_update  # tests/ is this script's directory

        return {"ok": True, "message": json.dumps(publish_update(one["publish_update"])), "outputs": None}
    if "save_remote" in one:
        engine.save_remote_model(url=one["save_remote"])
        return {"ok": True, "message": None, "outputs": None}
    u = one["update"]
    race = PublishWhenHeld(one["race"]) if one.get("race") else None
    t0 = time.perf_counter()
    ok, message, *_ = engine.update_weights_from_disk(u["model_path"], load_format=u.get("load_format"))
    seconds = time.perf_counter() - t0
    if race is not None:
        races[one["label"]] = race.done()
    return {"ok": bool(ok), "message": message, "seconds": seconds, "outputs": generate(engine, spec["prompts"])}


def refusals(overrides: list[dict]) -> dict:
    """(no engine) The loader's refusal of each set of parallel settings (on top of tp=2 with nothing else), with
    SGLang's parallel context stood in; and the names it checks that SGLang's parallel context does not know."""
    from types import SimpleNamespace
    from unittest import mock

    from sglang.srt import runtime_context

    from raydist_loader.engines import sglang as plugin

    messages = []
    for override in overrides:
        parallel = SimpleNamespace(**{"tp_size": 2, "tp_rank": 0, "attn_tp_size": 2, **override})
        model = SimpleNamespace(is_startup_weight_load_overlap=False)
        with mock.patch.object(runtime_context, "get_parallel", lambda p=parallel: p), \
                mock.patch.object(runtime_context, "get_model", lambda m=model: m):
            try:
                plugin.tensor_parallel()
                messages.append(None)
            except Exception as e:  # noqa: BLE001 - the test reads the message
                messages.append(str(e))
    padded = SimpleNamespace(original_num_attention_heads=4, num_attention_heads=8,  # one kv head padded to two at
                             original_total_num_kv_heads=1, num_key_value_heads=2)  # tp=2 (as gemma's MQA gets)
    gpt2 = SimpleNamespace(original_num_attention_heads=8, num_attention_heads=8,  # no num_key_value_heads: MHA
                           original_total_num_kv_heads=8)
    for config, tp in ((padded, 2), (gpt2, 1), (gpt2, 2)):
        try:
            plugin.refuse_padded_heads(config, tp)
            messages.append(None)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            messages.append(str(e))
    names = [name for _, name, _ in plugin.UNMODELLED] + ["attn_tp_size", "tp_size", "tp_rank"]
    known = runtime_context._parallel_fields() | {"tp_rank"}
    return {"refusals": messages, "unknown_names": [n for n in names if n not in known],
            "registered": registered_twice()}


def registered_twice() -> dict:
    """(no engine) After SGLang's own load_plugins() and two more register() calls: how often load format
    ``raydist`` is among SGLang's choices and how many hooks the plugin holds on its target; and whether a
    ``LoadConfig(load_format="raydist")`` resolves to the loader class."""
    from sglang.srt.arg_groups.choices import LOAD_FORMAT_CHOICES
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from raydist_loader.engines import sglang as plugin

    load_plugins()
    plugin.register()
    plugin.register()
    hooks = [h for _, h, _ in HookRegistry._hooks[plugin.VERIFY_TARGET] if h is plugin._verify_load_format]
    resolved = LoadConfig(load_format="raydist").load_format
    return {"choices": LOAD_FORMAT_CHOICES.count(plugin.LOAD_FORMAT), "hooks": len(hooks),
            "resolves_to": getattr(resolved, "__name__", str(resolved))}


def run(spec: dict) -> dict:
    import sglang

    result: dict = {"outputs": None, "steps": {}, "races": {}, "weight_versions": None, "start_s": None,
                    "error": None}
    if "refusals" in spec:
        return {**result, **refusals(spec["refusals"])}
    os.environ.update(spec.get("env", {}))
    race = PublishWhenHeld(spec["race"]) if spec.get("race") else None
    t0 = time.perf_counter()
    try:
        engine = sglang.Engine(**{**CPU, **spec["engine"]})
    except BaseException as e:  # noqa: BLE001 - the test asserts on it (and on the log)
        result["error"] = f"{type(e).__name__}: {e}"
        return result
    finally:
        if race is not None:
            result["races"]["start"] = race.done()
    result["start_s"] = time.perf_counter() - t0
    try:
        if spec.get("prompts"):
            result["outputs"] = generate(engine, spec["prompts"])
            result["weight_versions"] = [m.get("weight_version") for m in LAST_META]
        for one in spec.get("steps", []):
            result["steps"][one["label"]] = step(engine, spec, one, result["races"])
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    finally:
        engine.shutdown()
    return result


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    results = {}
    for one in spec["runs"]:
        t0 = time.perf_counter()
        results[one["name"]] = run(one)
        results[one["name"]]["engine_s"] = time.perf_counter() - t0
        print(f"[sglang_engine] {one['name']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        with open(out_path, "w") as f:  # after every run: a later crash keeps the earlier results
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
