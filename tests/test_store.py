"""publish / index / inspect / verify / pull_files / gc against a directory, a real redis-server and moto's S3."""

from __future__ import annotations

import json
import random

import pytest
import torch

import raydist_loader as rl
from raydist_loader import connectors
from raydist_loader.connectors import Connector, open_connector, register_connector
from raydist_loader.connectors.file import FileConnector
from raydist_loader.errors import BackendError, ConfigError, ManifestError, NotFoundError, ShardingError
from raydist_loader.store.manifest import Manifest
from raydist_loader.store.versions import read_manifest
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import single_manifest_layout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "llama": make_tiny_checkpoint("llama", root / "llama", dtype=torch.bfloat16),  # GQA: 8 q heads, 2 kv heads
        "gpt2": make_tiny_checkpoint("gpt2", root / "gpt2"),
    }


def _manifest(url: str, model: str) -> Manifest:
    with open_connector(url) as conn:
        return read_manifest(conn, model)


def _flip_byte(url: str, key: str, offset: int) -> None:
    with open_connector(url) as conn:
        data = bytearray(conn.read(key))
        data[offset] ^= 0x01
        conn.write(key, bytes(data))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_publish_then_verify_on_every_backend(store_url, checkpoints, kind):
    result = rl.publish(checkpoints[kind], store_url, kind, max_tp=4, part_bytes=256 << 10)
    assert result.tensors > 10 and result.bytes > 0 and result.seconds > 0
    manifest = _manifest(store_url, kind)
    assert manifest.version == result.version and manifest.layout == "chunked"
    assert {"config.json", "tokenizer.json"} <= set(manifest.files)
    check = rl.verify(store_url, kind)
    assert check.ok and check.chunks == sum(len(manifest.chunks(n)) for n in manifest.tensors)


def test_flipped_byte_in_any_chunk_is_named(store_url, checkpoints):
    rl.publish(checkpoints["llama"], store_url, "m", max_tp=2, part_bytes=256 << 10)
    manifest = _manifest(store_url, "m")
    rng = random.Random(7)
    chunks = [(n, c) for n in manifest.tensors for c in manifest.chunks(n)]
    for name, chunk in rng.sample(chunks, 3):
        part = rng.choice(chunk.parts)
        offset = part.offset + rng.randrange(part.nbytes)
        _flip_byte(store_url, part.object, offset)
        result = rl.verify(store_url, "m")
        assert [(f["tensor"], f["chunk"]) for f in result.failures] == [(name, chunk.id)]
        _flip_byte(store_url, part.object, offset)  # restore
    assert rl.verify(store_url, "m").ok


def test_inspect_tp2_each_rank_moves_half_of_every_split_tensor(store_url, checkpoints):
    rl.publish(checkpoints["llama"], store_url, "m", max_tp=2)
    summary = rl.inspect(store_url, "m", tp=2)
    manifest = _manifest(store_url, "m")
    replicated = sum(t.nbytes for n, t in manifest.tensors.items() if manifest.rule(n).dim is None)
    split = manifest.total_bytes - replicated
    ranks = summary["ranks"]
    assert [r["replicated_bytes"] for r in ranks] == [replicated, replicated]
    # vocab halves differ by a few rows (250 rows: 128 + 122), everything else is exactly half
    assert sum(r["split_bytes"] for r in ranks) == split
    assert abs(ranks[0]["split_bytes"] - ranks[1]["split_bytes"]) <= 2 * 6 * 64 * 2
    assert all(r["bytes"] == r["bytes_read"] for r in ranks)


def test_index_in_place_leaves_the_checkpoint_untouched(store_url, checkpoints):
    ckpt = checkpoints["llama"]
    with open_connector(store_url) as conn:
        for path in sorted(ckpt.iterdir()):
            conn.write(f"hf/{path.name}", path.read_bytes())
        before = {k: conn.read(k) for k in conn.list("hf/")}
    result = rl.index(store_url, "hf", max_tp=2)
    assert result.layout == "inplace"
    assert rl.verify(store_url, "hf").ok
    with open_connector(store_url) as conn:
        after = {k: conn.read(k) for k in conn.list("hf/")
                 if k != "hf/manifest.json" and k != f"hf/{result.version}/manifest.json"}
        assert after == before
    weights = next(k for k in before if k.endswith(".safetensors"))
    _flip_byte(store_url, weights, len(before[weights]) - 1)
    failures = rl.verify(store_url, "hf").failures
    assert len(failures) == 1 and failures[0]["tensor"] and failures[0]["chunk"]


def test_pull_files_writes_config_and_tokenizer_byte_for_byte(tmp_path, checkpoints):
    url = f"file://{tmp_path}/store"
    rl.publish(checkpoints["llama"], url, "m", max_tp=2)
    written = rl.pull_files(url, "m", tmp_path / "out")
    assert {p.name for p in written} >= {"config.json", "tokenizer.json", "tokenizer_config.json"}
    for p in written:
        assert p.read_bytes() == (checkpoints["llama"] / p.name).read_bytes()


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "a/../../b", ".", "a//b"])
def test_pull_files_refuses_names_outside_dest(tmp_path, checkpoints, name):
    url = f"file://{tmp_path}/store"
    rl.publish(checkpoints["llama"], url, "m", max_tp=2)
    single_manifest_layout(url, "m")  # the manifest edited in place at <model>/manifest.json
    raw = json.loads((tmp_path / "store" / "m" / "manifest.json").read_bytes())
    raw["files"][name] = raw["files"]["config.json"]
    (tmp_path / "store" / "m" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(rl.RaydistError, match="file name"):  # refused when the manifest is read
        rl.pull_files(url, "m", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_republish_then_gc_removes_only_the_old_version(store_url, checkpoints):
    first = rl.publish(checkpoints["llama"], store_url, "m", max_tp=2)
    second = rl.publish(checkpoints["llama"], store_url, "m", max_tp=2)
    assert first.version != second.version
    kept = rl.gc(store_url, "m")  # within the grace period nothing goes
    assert kept["deleted"] == [] and len(kept["kept"]) == 2
    result = rl.gc(store_url, "m", grace_s=0)
    assert result["deleted"] == [f"m/{first.version}/"] and result["kept"] == [f"m/{second.version}/"]
    with open_connector(store_url) as conn:
        assert not list(conn.list(f"m/{first.version}/"))
    assert rl.verify(store_url, "m").ok


class _FailAfter(FileConnector):
    """A file store whose 4th write fails: a publish dies half-way."""

    schemes = ("failafter",)
    writes = 0

    def __init__(self, url: str):
        super().__init__(url.replace("failafter://", "file://"))

    def write(self, key, data):
        type(self).writes += 1
        if type(self).writes == 4:
            raise OSError("disk full")
        super().write(key, data)


def test_half_published_model_is_never_taken_for_complete(tmp_path, checkpoints, monkeypatch):
    monkeypatch.setattr(connectors, "_registered", {})  # registrations stay local to this test
    register_connector("failafter", _FailAfter)
    url = f"failafter://{tmp_path}/store"
    with pytest.raises(BackendError, match=r"failed: disk full; removed (\d+) of the \1 object.*no version of 'm'"):
        rl.publish(checkpoints["llama"], url, "m", max_tp=2, part_bytes=32 << 10, concurrency=1)
    assert not any((tmp_path / "store" / "m").rglob("*.safetensors")), "the chunks written were removed"
    with pytest.raises(NotFoundError, match="not found.*publish"):
        rl.verify(f"file://{tmp_path}/store", "m")


def test_missing_model_says_how_to_publish(store_url):
    with pytest.raises(NotFoundError, match=r"model 'nope' not found.*raydist-loader publish"):
        rl.inspect(store_url, "nope")


def test_checkpoint_without_manifest_says_to_index(tmp_path, checkpoints):
    store = tmp_path / "store" / "hf"
    store.mkdir(parents=True)
    for p in checkpoints["llama"].iterdir():
        (store / p.name).write_bytes(p.read_bytes())
    with pytest.raises(NotFoundError, match="raydist-loader index"):
        rl.inspect(f"file://{tmp_path}/store", "hf")


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda m: m.pop("tensors"), r"field tensors: Field required"),
        (lambda m: m.update(max_tp="eight"), r"field max_tp"),
        (lambda m: next(iter(m["tensors"].values()))["xxh3"].pop(), r"xxh3: 1 digests for a chunk grid of 2 chunks"),
        (lambda m: next(iter(m["tensors"].values()))["xxh3"].__setitem__(0, "xyz"), r"xxh3\[0\]: not 32 hex"),
        (lambda m: next(iter(m["tensors"].values())).update(dtype="float42"), r"dtype: unknown dtype 'float42'"),
        (lambda m: next(iter(m["tensors"].values())).update(shape=[7, 7]), r"chunk grid of 1 chunks"),
        (lambda m: next(iter(m["tensors"].values())).update(rule=99), r"rule: 99 is not an index of tensor_rules"),
        (lambda m: next(iter(m["tensors"].values()))["at"].__setitem__(0, 99), r"at: an object index outside"),
        (lambda m: m.update(format="raydist-loader/9"), r"format 'raydist-loader/9' is not supported.*upgrade"),
        (lambda m: m.update(format="raydist-loader/1"), r"format 'raydist-loader/1' is no longer read.*re-publish"),
        (lambda m: m.update(version="../x"), r"field version"),
        (lambda m: m["objects"].__setitem__(0, "other/v1/x"), r"objects\[0\]: object 'other/v1/x' is outside m/v"),
        (
            lambda m: m["tensor_rules"][m["tensors"]["model.layers.0.self_attn.q_proj.weight"]["rule"]].update(dim=5),
            r"rule: split dim 5 is outside a tensor of shape",
        ),
    ],
)
def test_garbled_manifest_names_the_field(tmp_path, checkpoints, edit, pattern):
    url = f"file://{tmp_path}/store"
    rl.publish(checkpoints["llama"], url, "m", max_tp=2)
    single_manifest_layout(url, "m")  # the manifest edited in place at <model>/manifest.json
    path = tmp_path / "store" / "m" / "manifest.json"
    raw = json.loads(path.read_bytes())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=pattern):
        rl.inspect(url, "m")


def test_manifest_that_is_not_json(tmp_path, checkpoints):
    url = f"file://{tmp_path}/store"
    rl.publish(checkpoints["llama"], url, "m", max_tp=2)
    (tmp_path / "store" / "m" / "manifest.json").write_bytes(b'{"format": "raydist-loader/1", "mod')
    with pytest.raises(ManifestError, match="not valid JSON"):
        rl.verify(url, "m")


def test_source_without_safetensors_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no \*\.safetensors files"):
        rl.publish(tmp_path / "src", f"file://{tmp_path}/store", "m")
    assert not (tmp_path / "store").exists()


def test_max_tp_the_model_cannot_be_cut_into_is_refused_with_the_fix(tmp_path, checkpoints):
    with pytest.raises(ShardingError, match=r"max_tp=16.*--max-tp 8"):
        rl.publish(checkpoints["llama"], f"file://{tmp_path}/store", "m", max_tp=16)
    assert not (tmp_path / "store").exists()


def test_password_never_echoed(redis_server):
    url = f"redis://default:hunter2secret@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(Exception) as info:
        rl.inspect(url, "nope")
    assert "hunter2secret" not in str(info.value)
    assert "hunter2secret" not in repr(open_connector(url))


def test_connectors_are_not_shipped_between_processes(tmp_path):
    conn: Connector = open_connector(str(tmp_path))
    with pytest.raises(TypeError, match="open one per process"):
        conn.__getstate__()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_chunk_object_is_one_clear_error(store_url, checkpoints, damage):
    rl.publish(checkpoints["llama"], store_url, "m", max_tp=2)
    manifest = _manifest(store_url, "m")
    part = manifest.chunks("model.layers.1.mlp.up_proj.weight")[0].parts[0]
    with open_connector(store_url) as conn:
        if damage == "missing":
            conn.delete(part.object)
        else:
            conn.write(part.object, conn.read(part.object)[: part.offset + part.nbytes - 7])
    pattern = "does not exist" if damage == "missing" else "truncated object"
    with pytest.raises(rl.RaydistError, match=pattern) as info:
        rl.load_shard("m", store_url, 2, 0, device="cpu", retries={"attempts": 1})
    assert part.object.split("/")[-1] in str(info.value)
    failures = rl.verify(store_url, "m").failures
    assert ("model.layers.1.mlp.up_proj.weight", "all.0") in [(f.get("tensor"), f.get("chunk")) for f in failures]


def test_publish_takes_the_shards_the_index_names_and_no_other_weights(tmp_path, checkpoints):
    """Beside HF shards a checkpoint may hold consolidated.safetensors (Mistral) or *.bin copies: not published."""
    import shutil

    from safetensors import safe_open

    src = tmp_path / "src"
    shutil.copytree(checkpoints["llama"], src)
    with safe_open(src / "model.safetensors", "pt") as f:
        names = list(f.keys())
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names,
                                                                                           "model.safetensors")}))
    shutil.copy(src / "model.safetensors", src / "consolidated.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    rl.publish(src, f"file://{tmp_path}/store", "m", max_tp=2)
    manifest = _manifest(f"file://{tmp_path}/store", "m")
    assert set(manifest.tensors) == set(names)
    assert "pytorch_model.bin" not in manifest.files and "consolidated.safetensors" not in manifest.files
    assert rl.verify(f"file://{tmp_path}/store", "m").ok
