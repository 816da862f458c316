"""publish_state_dict / open_version: a state dict straight from memory to a directory, a real redis-server and
moto's S3; one process, parts from threads and from real processes, and every refusal naming what it refuses."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import raydist_loader as rl
from raydist_loader.connectors import open_connector
from raydist_loader.errors import ConfigError, ConflictError, ShardingError
from raydist_loader.store import versions
from raydist_loader.store.manifest import Manifest, version_prefix
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import assert_shards_match

QKV = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def state(llama) -> dict[str, torch.Tensor]:
    return load_file(llama / "model.safetensors")


@pytest.fixture
def swaps(monkeypatch) -> list[str]:
    """Every pointer swap's version, in order (the real swap runs: this only counts)."""
    seen, swap_to, lock = [], versions.swap_to, threading.Lock()

    def counted(conn, model, ref, start, *, what):
        pointer = swap_to(conn, model, ref, start, what=what)
        with lock:
            seen.append(ref.version)
        return pointer

    monkeypatch.setattr(versions, "swap_to", counted)
    return seen


def _manifest(url: str, model: str) -> Manifest:
    with open_connector(url) as conn:
        return versions.read_manifest(conn, model)


def _current(url: str, model: str) -> str | None:
    with open_connector(url) as conn:
        cur = versions.current_or_none(conn, model)
        return cur.version if cur else None


def _load_and_check(url: str, model: str, original: dict[str, torch.Tensor], tp: int = 2) -> None:
    shards = [rl.load_shard(model, url, tp, rank, device="cpu") for rank in range(tp)]
    assert_shards_match(original, [(s.tensors, s.metadata) for s in shards])
    assert rl.verify(url, model).ok


def _split(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = sorted(state)
    return [{k: state[k] for k in names[i::n]} for i in range(n)]


# ------------------------------------------------------------------------------------------ one process
def test_round_trip_equals_a_directory_publish(store_url, llama, state):
    result = rl.publish_state_dict(state, store_url, "mem", files_from=llama, max_tp=2, part_bytes=256 << 10,
                                   digests=("xxh3_128", "blake3"))
    assert result.current and result.tensors == len(state) and result.layout == "chunked"
    assert {"config.json", "tokenizer.json"} <= set(result.files)
    assert "model.safetensors" in {s.name for s in result.skipped}
    rl.publish(llama, store_url, "dir", max_tp=2, part_bytes=256 << 10, digests=("xxh3_128", "blake3"))
    mem, ref = _manifest(store_url, "mem"), _manifest(store_url, "dir")
    assert mem.version == result.version and mem.config == ref.config and mem.digests == ref.digests

    def records(m: Manifest) -> dict:
        return {n: (t.dtype, t.shape, t.xxh3, t.blake3, m.rule(n)) for n, t in m.tensors.items()}

    assert records(mem) == records(ref)
    def files(m: Manifest) -> dict:
        return {n: (f.xxh3, f.blake3) for n, f in m.files.items()}

    assert files(mem) == files(ref)
    assert all(state[n].dtype == torch.bfloat16 for n in state)
    _load_and_check(store_url, "mem", state)


def test_files_inherited_from_the_current_version_are_copied_into_the_new_one(store_url, llama, state, tmp_path):
    first = rl.publish(llama, store_url, "m", max_tp=2).version
    changed = {n: t + 1 for n, t in state.items()}
    second = rl.publish_state_dict(changed, store_url, "m", max_tp=2)
    assert second.current and _current(store_url, "m") == second.version != first
    old, new = _manifest_of(store_url, "m", first), _manifest(store_url, "m")
    assert new.config == old.config and set(new.files) == set(old.files)
    assert all(f.object.startswith(version_prefix("m", second.version)) for f in new.files.values())
    assert {n: f.xxh3 for n, f in new.files.items()} == {n: f.xxh3 for n, f in old.files.items()}
    rl.gc(store_url, "m", grace_s=0)  # the first version goes; the second keeps its own files
    with open_connector(store_url) as conn:
        assert not list(conn.list(version_prefix("m", first)))
    _load_and_check(store_url, "m", changed)
    written = rl.pull_files(store_url, "m", tmp_path / "files")
    assert {p.name: p.read_bytes() for p in written} == {p.name: (llama / p.name).read_bytes() for p in written}


def test_files_from_a_directory_of_config_and_tokenizer_only(tmp_path, llama, state):
    src = tmp_path / "files"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, src / name)
    (src / "notes.txt").write_text("not for engines")
    url = f"file://{tmp_path}/store"
    result = rl.publish_state_dict(state, url, "m", files_from=src, max_tp=2)
    assert sorted(_manifest(url, "m").files) == sorted(result.files) == ["config.json", "tokenizer.json",
                                                                         "tokenizer_config.json"]
    assert [s.name for s in result.skipped] == ["notes.txt"]
    _load_and_check(url, "m", state)


def test_inheriting_files_without_a_current_version_is_refused(store_url, state):
    with pytest.raises(ConfigError, match=r"no current version .* pass files_from=DIR"):
        rl.publish_state_dict(state, store_url, "m", max_tp=2)
    with pytest.raises(ConfigError, match=r"no current version .* pass files_from=DIR"):
        rl.open_version(store_url, "m", parts=2)
    assert _current(store_url, "m") is None


def test_tied_weights_sharing_storage_are_each_stored(tmp_path, llama, state):
    tied = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]})
    assert tied["lm_head.weight"].data_ptr() == tied["model.embed_tokens.weight"].data_ptr()
    url = f"file://{tmp_path}/store"
    rl.publish_state_dict(tied, url, "m", files_from=llama, max_tp=2)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(_manifest(url, "m").tensors)
    _load_and_check(url, "m", tied)


def test_non_contiguous_scalar_bool_and_empty_tensors_are_stored_as_their_values(tmp_path, llama, state):
    odd = dict(state, flag=torch.tensor([True, False]), scale=torch.tensor(3.0), empty=torch.zeros(0, 4))
    odd["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].t().contiguous().t()
    assert not odd["model.layers.0.mlp.up_proj.weight"].is_contiguous()
    url = f"file://{tmp_path}/store"
    rl.publish_state_dict(odd, url, "m", files_from=llama, max_tp=2, rules={"default": "replicate", "rules": []})
    _load_and_check(url, "m", dict(state, flag=odd["flag"], scale=odd["scale"], empty=odd["empty"]))


@pytest.mark.parametrize(
    ("edit", "error", "pattern"),
    [
        (lambda s: s.update(extra=[1, 2, 3]), ConfigError, r"tensor 'extra': got list, not a torch.Tensor"),
        (lambda s: s.update({QKV: torch.zeros(7, 64, dtype=torch.bfloat16)}), ShardingError, QKV.replace(".", r"\.")),
        (lambda s: s.update(weird=torch.zeros(2, dtype=torch.complex64)), ConfigError, r"tensor 'weird': dtype"),
        (lambda s: s.update(ghost=torch.empty(4, device="meta")), ConfigError, r"tensor 'ghost'"),
    ],
)
def test_bad_input_is_one_error_naming_the_tensor(tmp_path, llama, state, edit, error, pattern):
    bad = dict(state)
    edit(bad)
    with pytest.raises(error, match=pattern):
        rl.publish_state_dict(bad, f"file://{tmp_path}/store", "m", files_from=llama, max_tp=2)
    assert _current(f"file://{tmp_path}/store", "m") is None


def test_a_max_tp_a_tensor_cannot_be_cut_into_names_it(tmp_path, llama, state):
    with pytest.raises(ShardingError, match=r"max_tp=16: .*self_attn.*--max-tp 8"):
        rl.publish_state_dict(state, f"file://{tmp_path}/store", "m", files_from=llama, max_tp=16)


# ------------------------------------------------------------------------------------------ parts
@pytest.mark.parametrize("n", [2, 3])
def test_parts_from_threads_make_one_version_current_once(store_url, llama, state, swaps, n):
    before = rl.publish(llama, store_url, "m", max_tp=2).version
    token = rl.open_version(store_url, "m", parts=n, timeout_s=60)
    version = json.loads(token)["version"]
    pieces = _split(state, n)
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: rl.publish_state_dict(pieces[i], store_url, "m", max_tp=2, token=token,
                                                                part=i, wait=True, part_bytes=64 << 10), range(n)))
    assert [r.version for r in results] == [version] * n and all(r.current for r in results)
    assert sum(r.tensors for r in results) == len(state)
    assert swaps == [before, version]  # the directory publish, then the parts' one swap
    with open_connector(store_url) as conn:
        assert before in versions.read_current(conn, "m").retired
    manifest = _manifest(store_url, "m")
    assert manifest.version == version and set(manifest.tensors) == set(state)
    assert set(manifest.files) == set(_manifest_of(store_url, "m", before).files)  # inherited
    if manifest.objects:  # packed: no two parts share a file name
        assert len(set(manifest.objects)) == len(manifest.objects)
    _load_and_check(store_url, "m", state)


def _manifest_of(url: str, model: str, version: str) -> Manifest:
    with open_connector(url) as conn:
        return versions.read_manifest(conn, model, version)


def _publish_part_in_a_process(ckpt: str, url: str, token: str, part: int, parts: int) -> int:
    """In a spawned process: part ``part`` of the checkpoint's tensors."""
    state = load_file(Path(ckpt) / "model.safetensors")
    names = sorted(state)[part::parts]
    result = rl.publish_state_dict({n: state[n] for n in names}, url, "m", max_tp=2, token=token, part=part,
                                   wait=True)
    return result.tensors


@pytest.mark.parametrize("store_url", ["file", "redis"], indirect=True)
def test_parts_from_separate_processes(store_url, llama, state, tmp_path):
    token = rl.open_version(store_url, "m", parts=2, timeout_s=120, files_from=llama)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        counts = pool.starmap(_publish_part_in_a_process, [(str(llama), store_url, token, i, 2) for i in range(2)])
    assert sum(counts) == len(state)
    assert _current(store_url, "m") == json.loads(token)["version"]
    _load_and_check(store_url, "m", state)


def test_a_missing_part_leaves_the_previous_version_current(store_url, llama, state, swaps):
    before = rl.publish(llama, store_url, "m", max_tp=2).version
    token = rl.open_version(store_url, "m", parts=3, timeout_s=6)  # room for a busy machine
    pieces = _split(state, 3)
    first = rl.publish_state_dict(pieces[0], store_url, "m", max_tp=2, token=token, part=0)
    assert not first.current and _current(store_url, "m") == before
    open_prefix = f"m/{first.version}/"
    assert "is open until" in rl.gc(store_url, "m", grace_s=0, dry_run=True)["reasons"][open_prefix], "gc waits"
    with pytest.raises(ConflictError, match=r"did not become current by its deadline: part\(s\) 2 of 3 never arrived;"
                                            f" version {before} stays current"):
        rl.publish_state_dict(pieces[1], store_url, "m", max_tp=2, token=token, part=1, wait=True)
    with pytest.raises(ConflictError, match=r"part 2 of version .* arrived .* after its deadline"):
        rl.publish_state_dict(pieces[2], store_url, "m", max_tp=2, token=token, part=2)
    assert swaps == [before] and _current(store_url, "m") == before
    _load_and_check(store_url, "m", state)
    assert open_prefix in rl.gc(store_url, "m", grace_s=0, dry_run=True)["deleted"], "past its deadline it goes"


def test_a_part_published_twice_is_refused_naming_it(store_url, llama, state):
    token = rl.open_version(store_url, "m", parts=2, files_from=llama)
    pieces = _split(state, 2)
    rl.publish_state_dict(pieces[0], store_url, "m", max_tp=2, token=token, part=0)
    with pytest.raises(ConflictError, match=r"part 0 of version .* is already published"):
        rl.publish_state_dict(pieces[0], store_url, "m", max_tp=2, token=token, part=0)
    rl.publish_state_dict(pieces[1], store_url, "m", max_tp=2, token=token, part=1)
    assert _current(store_url, "m") == json.loads(token)["version"]
    _load_and_check(store_url, "m", state)


def test_a_tensor_in_two_parts_is_refused_naming_it(store_url, llama, state):
    token = rl.open_version(store_url, "m", parts=2, files_from=llama)
    pieces = _split(state, 2)
    shared = sorted(pieces[0])[0]
    rl.publish_state_dict(pieces[0], store_url, "m", max_tp=2, token=token, part=0)
    with pytest.raises(ConfigError, match=rf"tensor '{shared}' is in part 0 and part 1"):
        rl.publish_state_dict(dict(pieces[1], **{shared: state[shared]}), store_url, "m", max_tp=2, token=token,
                              part=1)
    rl.publish_state_dict(pieces[1], store_url, "m", max_tp=2, token=token, part=1)  # the part, fixed
    _load_and_check(store_url, "m", state)


def test_an_empty_part_is_a_part(tmp_path, llama, state):
    url = f"file://{tmp_path}/store"
    token = rl.open_version(url, "m", parts=2, files_from=llama)
    assert not rl.publish_state_dict({}, url, "m", max_tp=2, token=token, part=0).current
    assert rl.publish_state_dict(state, url, "m", max_tp=2, token=token, part=1).current
    _load_and_check(url, "m", state)


@pytest.mark.parametrize("part", [-1, 2, "0", None])
def test_a_part_index_out_of_range_is_refused(tmp_path, llama, state, part):
    url = f"file://{tmp_path}/store"
    token = rl.open_version(url, "m", parts=2, files_from=llama)
    with pytest.raises(ConfigError, match=r"part=.* is out of range: .*parts=2 \(0\.\.1\)"):
        rl.publish_state_dict(state, url, "m", max_tp=2, token=token, part=part)


def test_parts_that_disagree_on_max_tp_are_not_merged(tmp_path, llama, state):
    url = f"file://{tmp_path}/store"
    token = rl.open_version(url, "m", parts=2, files_from=llama)
    pieces = _split(state, 2)
    rl.publish_state_dict(pieces[0], url, "m", max_tp=2, token=token, part=0)
    with pytest.raises(ConfigError, match=r"part 0 of version .* max_tp=2, part 1 with 4"):
        rl.publish_state_dict(pieces[1], url, "m", max_tp=4, token=token, part=1)
    assert _current(url, "m") is None


def test_a_token_for_another_model_or_garbled_is_refused(tmp_path, llama, state):
    url = f"file://{tmp_path}/store"
    token = rl.open_version(url, "m", parts=1, files_from=llama)
    with pytest.raises(ConfigError, match=r"opened a version of 'm', not of 'other'"):
        rl.publish_state_dict(state, url, "other", token=token, part=0)
    with pytest.raises(ConfigError, match=r"token: not one open_version returned"):
        rl.publish_state_dict(state, url, "m", token="{}", part=0)
    with pytest.raises(ConfigError, match=r"pass token= from open_version"):
        rl.publish_state_dict(state, url, "m", part=0, files_from=llama)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_are_published_as_their_host_copies(tmp_path, llama, state):
    url = f"file://{tmp_path}/store"
    rl.publish_state_dict({n: t.cuda() for n, t in state.items()}, url, "m", files_from=llama, max_tp=2)
    _load_and_check(url, "m", state)
