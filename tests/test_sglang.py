"""SGLang serving with ``load_format="raydist"``, checked against SGLang itself (its CPU path, in ``.venv-sglang``).

Every engine here is started with ``load_format="raydist"`` on a directory that holds only what ``pull_files``
wrote (config, tokenizer, ``raydist.json``; no weights), so the plugin entry point, the options and the TP ranks
are SGLang's own. The reference is SGLang's own loader on the same checkpoint at the same TP, in the same engine:
after generating, the engine reloads the checkpoint with ``update_weights_from_disk(ckpt, load_format="auto")``
and generates again; greedy tokens and top-5 logprobs must be equal, exactly. The RL weight update is checked in
the same engine: a new version published to the store, ``update_weights_from_disk(DIR, load_format="raydist")``,
equal to SGLang's own loader on that checkpoint; then a version with a flipped byte: the update fails naming rank,
tensor and chunk, and the previous weights keep serving. One version per engine: llama-tp2-redis starts, and
later updates, while a publish lands with one rank held at its first manifest read (``faulty+...?hold=DIR``);
every rank stays on one version, its tokens and logprobs SGLang's own loader's for that checkpoint. An engine start
costs ~15-30 s here, so all engines run in one script (tests/sglang_engine.py) at module start, and the tests below
assert on its results and log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import raydist_loader as rl
from raydist_loader.connectors import open_connector
from raydist_loader.store.versions import read_manifest
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .conftest import RedisServer, free_port
from .rl_steps import step_checkpoint
from .shards import faulty_site, flip_one_byte, rerandomise

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PY = ROOT / ".venv-sglang" / "bin" / "python"
MAX_TP = 4
PROMPTS = [[1, 5, 7, 9, 11, 13], [1, 20, 30], [1, 100, 200, 240]]
# 4 q heads over 2 kv heads (GQA); vocab 250 is padded to 256, so rank 1 of tp=2 holds 122 vocab rows.
SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}
MODELS: dict[str, dict] = {
    "llama": SHAPE,
    "phi3": SHAPE,  # fused qkv_proj [q; k; v] and gate_up_proj [gate; up]
    "qwen2": SHAPE,  # q/k/v biases
    "gemma": {**SHAPE, "num_key_value_heads": 1, "head_dim": 32},  # MQA, tied embeddings, norms (1 + w)
}
TP2 = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}  # two workers on two cores, one NUMA node
CORRUPT_TENSOR, CORRUPT_CHUNK = "model.layers.1.mlp.down_proj.weight", "all.3"  # rowwise: rank 1 of tp=2 reads it
# (name, model, store the engine starts from, tp, options given? (else raydist.json in the model directory))
# gemma's one kv head at tp=2: SGLang's CPU path pads the heads (1 kv head -> 2, q heads doubled), a cut the store
# does not serve (refused, see test_parallel_settings_...): gemma runs at tp=1 here.
EXACT = [("llama-tp2-redis", "llama", "redis", 2, True), ("phi3-tp2-file", "phi3", "file", 2, False),
         ("qwen2-tp2-file", "qwen2", "file", 2, True), ("gemma-tp1-redis", "gemma", "redis", 1, False)]


def _publish(tmp: Path, redis_url: str) -> dict[str, dict]:
    """Each model (its own seed) published to a file store and to Redis, with a model directory pulled from each;
    llama also gets two more checkpoints (v2, v3) for the weight updates."""
    file_url = f"file://{tmp}/store"
    out = {}
    for seed, (model_type, overrides) in enumerate(MODELS.items()):
        ckpts = {}
        for version, offset in (("v1", 0), ("v2", 100), ("v3", 200))[: 3 if model_type == "llama" else 1]:
            ckpts[version] = str(make_tiny_checkpoint(
                model_type, tmp / f"{model_type}-{version}", seed=seed + offset, **overrides))
            rerandomise(Path(ckpts[version]), seed + offset)
        stores = {"file": file_url, "redis": redis_url}
        dirs = {}
        for kind, url in stores.items():
            rl.publish(ckpts["v1"], url, model_type, max_tp=MAX_TP)
            dirs[kind] = str(tmp / f"{model_type}-{kind}-dir")
            rl.pull_files(url, model_type, dirs[kind])
        out[model_type] = {"ckpts": ckpts, "stores": stores, "dirs": dirs}
    return out


def _exact_run(name: str, model: str, store: str, tp: int, with_options: bool, m: dict) -> dict:
    engine = {"model_path": m["dirs"][store], "load_format": "raydist", "tp_size": tp}
    if with_options:
        engine["model_loader_extra_config"] = json.dumps({"url": m["stores"][store], "model": model})
    return {"name": name, "env": TP2 if tp == 2 else {}, "engine": engine, "prompts": PROMPTS,
            "steps": [{"label": "sglang", "update": {"model_path": m["ckpts"]["v1"], "load_format": "auto"}}]}


@pytest.fixture(scope="module")
def sglang(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not SGLANG_PY.exists():
        pytest.fail(f"{SGLANG_PY} is missing: run scripts/setup.sh (it builds SGLang's CPU venv)", pytrace=False)
    tmp = tmp_path_factory.mktemp("sglang")
    (tmp / "redis").mkdir()
    redis = RedisServer(port=free_port(), workdir=tmp / "redis")
    redis.start()
    try:
        return _run_engines(tmp, redis.url)
    finally:
        redis.stop()


def _race_store(tmp: Path, llama: dict, redis_url: str) -> dict:
    """llama v1 published as ``llama-race``, loaded through ``faulty+`` with a hold; a model directory whose
    ``raydist.json`` names it (for updates)."""
    v1 = rl.publish(llama["ckpts"]["v1"], redis_url, "llama-race", max_tp=MAX_TP).version
    hold = tmp / "hold"
    hold.mkdir()
    url = f"faulty+{redis_url}?hold={hold}"
    directory = tmp / "llama-race-dir"
    shutil.copytree(llama["dirs"]["redis"], directory)
    (directory / "raydist.json").write_text(json.dumps({"url": url, "model": "llama-race"}))
    pinned = tmp / "llama-race-v1-dir"  # pulled as a user pins a directory: raydist.json names the store and v1
    rl.pull_files(redis_url, "llama-race", pinned, model_version=v1)
    return {"url": url, "v1": v1, "hold": str(hold), "dir": str(directory), "pinned_dir": str(pinned)}


def _race(race: dict, ckpt: str, redis_url: str) -> dict:
    return {"hold": race["hold"], "publish": {"ckpt": ckpt, "url": redis_url, "model": "llama-race", "max_tp": MAX_TP}}


def _rl_steps(llama: dict, redis_url: str, tmp: Path) -> list[dict]:
    """RL weight updates in the serving engine: a trainer publishes v2 from memory (stored whole), then a step of it
    (stored as deltas), then another whose delta is damaged in the store; the engine updates after each."""
    steps = [step_checkpoint(llama["ckpts"]["v2"], tmp / f"llama-rl-{k}", seed=k) for k in (1, 2)]
    publish = lambda ckpt, **more: {"ckpt": ckpt, "url": redis_url, "model": "llama", "max_tp": MAX_TP, **more}  # noqa: E731
    update = {"model_path": llama["dirs"]["redis"], "load_format": "raydist"}
    return [
        {"label": "rl-publish-whole", "publish_update": publish(llama["ckpts"]["v2"])},
        {"label": "rl-whole", "update": update},
        {"label": "rl-publish-delta", "publish_update": publish(steps[0])},
        {"label": "rl-delta", "update": update},
        {"label": "rl-delta-sglang", "update": {"model_path": steps[0], "load_format": "auto"}},
        {"label": "rl-publish-corrupt", "publish_update": publish(steps[1], corrupt=True)},
        {"label": "rl-corrupt", "update": update},
    ]


def _run_engines(tmp: Path, redis_url: str) -> dict:
    models = _publish(tmp, redis_url)
    llama = models["llama"]
    race = _race_store(tmp, llama, redis_url)
    corrupt = tmp / "corrupt-store"
    shutil.copytree(tmp / "store", corrupt)
    flip_one_byte(f"file://{corrupt}", "llama", CORRUPT_TENSOR, CORRUPT_CHUNK)
    runs = [_exact_run(*spec, models[spec[1]]) for spec in EXACT]
    # llama-tp2-redis starts from the raced store while v2 is published, then updates from it while v3 is
    runs[0]["engine"]["model_loader_extra_config"] = json.dumps({"url": race["url"], "model": "llama-race"})
    runs[0]["race"] = _race(race, llama["ckpts"]["v2"], redis_url)
    runs[0]["steps"] += [  # llama-tp2-redis, after its exact check: RL weight updates from the store
        {"label": "no-locator", "update": {"model_path": llama["ckpts"]["v1"], "load_format": "raydist"}},
        {"label": "publish-v2", "publish": {"ckpt": llama["ckpts"]["v2"], "url": redis_url, "model": "llama",
                                            "max_tp": MAX_TP}},
        {"label": "v2", "update": {"model_path": llama["dirs"]["redis"], "load_format": "raydist"}},
        {"label": "v2-sglang", "update": {"model_path": llama["ckpts"]["v2"], "load_format": "auto"}},
        {"label": "race-update", "update": {"model_path": race["dir"], "load_format": "raydist"},
         "race": _race(race, llama["ckpts"]["v3"], redis_url)},
        {"label": "pinned-update", "update": {"model_path": race["pinned_dir"], "load_format": "raydist"}},
        {"label": "v2-again", "update": {"model_path": llama["dirs"]["redis"], "load_format": "raydist"}},
        {"label": "publish-v3", "publish": {"ckpt": llama["ckpts"]["v3"], "url": redis_url, "model": "llama",
                                            "max_tp": MAX_TP},
         "corrupt": {"url": redis_url, "model": "llama", "tensor": CORRUPT_TENSOR, "chunk": CORRUPT_CHUNK}},
        {"label": "v3-corrupt", "update": {"model_path": llama["dirs"]["redis"], "load_format": "raydist"}},
        *_rl_steps(llama, redis_url, tmp),
    ]
    runs.append({"name": "refusals",
                 "refusals": [{"pp_size": 2}, {"moe_ep_size": 2}, {"attn_dp_size": 2, "attn_tp_size": 1}]})
    results, log = _engines(tmp, "engines", runs)
    # SGLang SIGKILLs its parent when a child fails at start-up: the engine that must not start runs on its own
    corrupt_run = {"name": "llama-tp2-corrupt", "env": TP2, "prompts": PROMPTS,
                   "engine": {"model_path": llama["dirs"]["file"], "load_format": "raydist", "tp_size": 2,
                              "model_loader_extra_config": json.dumps({"url": f"file://{corrupt}", "model": "llama"})}}
    corrupt_results, corrupt_log = _engines(tmp, "corrupt", [corrupt_run], must_exit_cleanly=False)
    return {"results": results, "log": log, "corrupt": corrupt_results.get("llama-tp2-corrupt"),
            "corrupt_log": corrupt_log, "models": models, "race": race}


def _engines(tmp: Path, tag: str, runs: list[dict], must_exit_cleanly: bool = True) -> tuple[dict, str]:
    """Run tests/sglang_engine.py on ``runs`` in the SGLang venv; its results (by run name) and log."""
    spec, out, log = tmp / f"{tag}.json", tmp / f"{tag}-out.json", tmp / f"{tag}.log"
    spec.write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SGLANG_USE_CPU_ENGINE": "1", "TORCH_COMPILE_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), faulty_site(tmp), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as f:
        proc = subprocess.run([str(SGLANG_PY), str(ROOT / "tests" / "sglang_engine.py"), str(spec), str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900, check=False, cwd=tmp)
    text = log.read_text(errors="replace")
    if must_exit_cleanly and (proc.returncode != 0 or not out.exists()):
        pytest.fail(f"tests/sglang_engine.py exited {proc.returncode}; end of its log:\n{text[-6000:]}", pytrace=False)
    return (json.loads(out.read_text()) if out.exists() else {}), text


def _ok(sglang: dict, name: str) -> dict:
    result = sglang["results"][name]
    assert result["error"] is None, f"{name}: {result['error']}"
    return result


def _generated(outputs: list[dict] | None) -> list[dict]:
    assert outputs and len(outputs) == len(PROMPTS)
    assert all(len(o["tokens"]) == 8 and len(o["logprobs"]) == 8 for o in outputs)
    assert all(len(step) == 5 for o in outputs for step in o["logprobs"])
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", [spec[0] for spec in EXACT])
def test_tokens_and_logprobs_equal_sglang_own_loader(sglang, name):
    result = _ok(sglang, name)
    raydist = _generated(result["outputs"])
    reference = result["steps"]["sglang"]
    assert reference["ok"], reference["message"]
    assert _generated(reference["outputs"]) == raydist  # exact: tokens and every top-5 logprob


@pytest.mark.slow
def test_each_rank_pulled_only_its_shard(sglang):
    log = sglang["log"]
    for rank in range(2):
        assert f"raydist: rank {rank}/2: llama version " in log and f"raydist: rank {rank}/2: phi3 version " in log
    assert "raydist: rank 0/1: gemma version " in log and "raydist: rank 1/2: qwen2 version " in log
    with open_connector(sglang["models"]["llama"]["stores"]["file"]) as conn:
        manifest = read_manifest(conn, "llama")
        total = sum(c.nbytes for name in manifest.tensors for c in manifest.chunks(name))
    shard_mb = [float(line.split(" chunks, ")[1].split(" MB")[0]) for line in log.splitlines()
                if "raydist: rank " in line and "/2: phi3 version" in line]
    assert len(shard_mb) == 2 and all(mb * 1e6 < 0.75 * total for mb in shard_mb)


@pytest.mark.slow
def test_weight_update_pulls_the_store_current_version(sglang):
    result = _ok(sglang, "llama-tp2-redis")
    steps = result["steps"]
    assert steps["v2"]["ok"], steps["v2"]["message"]
    v2 = _generated(steps["v2"]["outputs"])
    assert v2 != result["outputs"], "the update to v2 must change the outputs"
    assert _generated(steps["v2-sglang"]["outputs"]) == v2  # SGLang's own loader on the v2 checkpoint
    assert steps["v2-again"]["ok"] and steps["v2-again"]["outputs"] == v2
    assert "pulled and verified for a weight update" in sglang["log"]


@pytest.mark.slow
def test_a_corrupt_update_fails_and_the_previous_weights_keep_serving(sglang):
    steps = _ok(sglang, "llama-tp2-redis")["steps"]
    failed = steps["v3-corrupt"]
    assert not failed["ok"]
    assert "VerificationError" in failed["message"] or "digest" in failed["message"], failed["message"]
    assert f"tensor {CORRUPT_TENSOR} chunk {CORRUPT_CHUNK}" in failed["message"]
    assert failed["outputs"] == steps["v2"]["outputs"]  # v2's tokens and logprobs, exactly


def _update_lines(log: str, model: str, version: str, tp: int) -> list[tuple[int, int, float, float]]:
    """Per rank, from an update's log line: (chunks built from the weights served, chunks, MB read, MB shard)."""
    pattern = re.compile(rf"raydist: rank (\d+)/{tp}: .*{model}.* version {version}.*?(\d+) of (\d+) chunks built "
                         r"from the weights served, ([\d.]+) MB read from the store for a ([\d.]+) MB shard")
    found = {int(m[1]): (int(m[2]), int(m[3]), float(m[4]), float(m[5])) for m in pattern.finditer(log)}
    return [found.get(rank) for rank in range(tp)]


@pytest.mark.slow
def test_an_rl_update_from_deltas_reads_only_them_and_equals_sglangs_own_loader(sglang):
    """A trainer's step published from memory as deltas: each rank builds every chunk from the weights it serves and
    the deltas, reading only those (a few percent of its shard), and serves exactly what SGLang's own loader gives
    on that step's checkpoint; a damaged delta fails the update on every rank and the step before keeps serving."""
    steps = _ok(sglang, "llama-tp2-redis")["steps"]
    whole, delta = (json.loads(steps[k]["message"]) for k in ("rl-publish-whole", "rl-publish-delta"))
    assert whole["update"]["base"] is None and delta["update"]["base"] == whole["version"]
    assert delta["update"]["deltas"] > 0
    assert steps["rl-whole"]["ok"] and steps["rl-delta"]["ok"], (steps["rl-whole"], steps["rl-delta"])
    assert steps["rl-delta"]["outputs"] == steps["rl-delta-sglang"]["outputs"]  # tokens and top-5 logprobs, exact
    assert steps["rl-delta"]["outputs"] != steps["rl-whole"]["outputs"]
    for rank, line in enumerate(_update_lines(sglang["log"], "llama", delta["version"], 2)):
        assert line is not None, f"rank {rank} logged no update to {delta['version']}"
        built, chunks, read_mb, shard_mb = line
        assert built == chunks > 0 and read_mb < 0.25 * shard_mb, line
    failed = steps["rl-corrupt"]
    assert not failed["ok"] and " chunk " in failed["message"], failed["message"]
    assert failed["outputs"] == steps["rl-delta-sglang"]["outputs"]


@pytest.mark.slow
def test_an_update_from_a_directory_without_raydist_json_says_how_to_make_one(sglang):
    step = _ok(sglang, "llama-tp2-redis")["steps"]["no-locator"]
    assert not step["ok"]
    assert "raydist.json does not exist" in step["message"] and "raydist-loader pull-files" in step["message"]
    assert step["outputs"] == _ok(sglang, "llama-tp2-redis")["outputs"]


@pytest.mark.slow
def test_a_flipped_byte_stops_sglang_naming_rank_tensor_and_chunk(sglang):
    result = sglang["corrupt"]  # None when SGLang killed the runner, as it does when a worker fails at start-up
    assert result is None or (result["error"] is not None and result["outputs"] is None), "must not start"
    log = sglang["corrupt_log"]
    assert "VerificationError" in log and f"rank 1: tensor {CORRUPT_TENSOR} chunk {CORRUPT_CHUNK}" in log


@pytest.mark.slow
def test_registration_is_idempotent_and_unmodelled_parallel_settings_are_refused_by_name(sglang):
    result = _ok(sglang, "refusals")
    assert result["unknown_names"] == [], "every setting checked must exist in SGLang's parallel context"
    assert result["registered"] == {"choices": 1, "hooks": 1, "resolves_to": "RaydistModelLoader"}  # idempotent
    pp, ep, dp_attention, padded, gpt2_tp1, gpt2_tp2 = result["refusals"]
    assert gpt2_tp1 is None and gpt2_tp2 is None, "a config without num_key_value_heads (GPT-2) is not padded"
    assert "does not model SGLang's --pp-size (pipeline parallelism) = 2" in pp
    assert "--ep-size (expert parallelism) = 2" in ep
    assert "SGLang padded the model's attention heads 4 -> 8, kv heads 1 -> 2 for tp_size=2" in padded
    assert "data-parallel attention) = 2" in dp_attention and "attention tensor-parallel size 1 != tp_size 2" in (
        dp_attention
    )


def _rank_versions(log: str, model: str) -> list[tuple[str, str]]:
    """(rank, version) of every per-rank log line of ``model``."""
    return [(line.split("raydist: rank ")[1].split(":")[0], line.split(f": {model} version ")[1].split()[0])
            for line in log.splitlines() if "raydist: rank " in line and f": {model} version " in line]


@pytest.mark.slow
def test_a_publish_racing_the_engine_start_leaves_every_rank_on_one_version(sglang):
    """Rank 1 is held at its first manifest read until v2 is published: both ranks still load v1 (before, each
    rank read the current manifest on its own: rank 1 got v2), SGLang reports v1 as its weight_version, and the
    tokens and logprobs are SGLang's own loader's on the v1 checkpoint."""
    result, v1 = _ok(sglang, "llama-tp2-redis"), sglang["race"]["v1"]
    race = result["races"]["start"]
    assert race["error"] is None and race["held"] and race["published"] not in (None, v1)
    assert _rank_versions(sglang["log"], "llama-race")[:2] in ([("0/2", v1), ("1/2", v1)], [("1/2", v1), ("0/2", v1)])
    assert result["weight_versions"] == [v1] * len(PROMPTS)
    assert _generated(result["outputs"]) == _generated(result["steps"]["sglang"]["outputs"])


@pytest.mark.slow
def test_a_publish_racing_an_update_leaves_every_rank_on_one_version(sglang):
    """update_weights_from_disk(DIR, "raydist") with v3 published while rank 1 is held: both ranks update to v2
    (current when the update began), exactly SGLang's own loader on the v2 checkpoint."""
    result = _ok(sglang, "llama-tp2-redis")
    race, v2 = result["races"]["race-update"], result["races"]["start"]["published"]
    assert race["error"] is None and race["held"] and race["published"] not in (None, v2)
    step = result["steps"]["race-update"]
    assert step["ok"], step["message"]
    assert sorted(_rank_versions(sglang["log"], "llama-race")[2:4]) == [("0/2", v2), ("1/2", v2)]
    assert _generated(step["outputs"]) == _generated(result["steps"]["v2-sglang"]["outputs"])


@pytest.mark.slow
def test_an_update_from_a_directory_pinning_a_version_loads_that_version(sglang):
    """update_weights_from_disk(DIR, "raydist") with DIR pulled with ``--model-version v1`` while v3 is current:
    every rank loads v1, exactly SGLang's own loader on the v1 checkpoint."""
    result, v1 = _ok(sglang, "llama-tp2-redis"), sglang["race"]["v1"]
    step = result["steps"]["pinned-update"]
    assert step["ok"], step["message"]
    assert sorted(_rank_versions(sglang["log"], "llama-race")[4:6]) == [("0/2", v1), ("1/2", v1)]
    assert _generated(step["outputs"]) == _generated(result["steps"]["sglang"]["outputs"])
