"""Real repo layouts (publish and index take the weights the index names, record the engine files, list the rest)
and zero-size tensors, on the file store, moto's S3 and a real redis-server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import raydist_loader as rl
from raydist_loader.cli import main
from raydist_loader.connectors import open_connector
from raydist_loader.connectors.file import FileConnector
from raydist_loader.connectors.s3 import S3Connector
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import assert_shards_match

CAP = 256 << 10
ENGINE_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
}
# name -> words its reason must contain
SKIPPED = {
    "consolidated.safetensors": "never read",
    "pytorch_model.bin": "never read",
    "pytorch_model.bin.index.json": "never read",
    "model.gguf": "never read",
    "training_state.pt": "never read",
    "original/": "folder",
    "big_unrelated.tar": "not a file an engine needs",
    "README.md": "not a file an engine needs",
    ".gitattributes": "not a file an engine needs",
    "tekken.json": "cap",
}


@pytest.fixture(scope="module")
def mistral_repo(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Mistral repo as it ships: HF shards + index, Mistral's consolidated.safetensors (native names that no
    rule matches: taking it would fail), .bin/.pt/.gguf copies, original/, engine files (one over the cap), a
    4 MB unrelated file and the usual README/.gitattributes."""
    src = make_tiny_checkpoint("mistral", tmp_path_factory.mktemp("repo") / "mistral", dtype=torch.bfloat16)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = list(state)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i * len(names) // 3 : (i + 1) * len(names) // 3]
        save_file({n: state[n] for n in part}, src / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    native = {"layers.0.attention.wq.weight": state["model.layers.0.self_attn.q_proj.weight"], "norm.weight":
              state["model.norm.weight"]}
    save_file(native, src / "consolidated.safetensors")
    for name in ("pytorch_model.bin", "model.gguf", "training_state.pt"):
        (src / name).write_bytes(b"\x80\x02not really weights" * 100)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"\0" * 1000)
    (src / "original" / "params.json").write_text("{}")
    with open(src / "big_unrelated.tar", "wb") as f:
        f.truncate(4 << 20)
    (src / "README.md").write_text("# tiny mistral\n")
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (src / "tokenizer.model").write_bytes(bytes(range(256)) * 40)
    (src / "tekken.json").write_bytes(b" " * (CAP + 1))
    return src, state


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every key read through the file and S3 connectors (ranges go through readv, whole objects through read)."""
    seen: list[str] = []
    for cls in (FileConnector, S3Connector):
        for verb in ("readv", "read"):

            def spy(self, key, *args, _original=getattr(cls, verb)):
                seen.append(key)
                return _original(self, key, *args)

            monkeypatch.setattr(cls, verb, spy)
    return seen


def _store(kind: str, request, tmp_path: Path) -> str:
    if kind == "file":
        return f"file://{tmp_path}/store"
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        server.start()
        with server.client() as client:
            client.flushdb()
        return server.url
    return f"s3://{request.getfixturevalue('s3_server').make_bucket(f'repo-{uuid.uuid4().hex[:8]}')}/store"


def _upload(src: Path, url: str, model: str) -> None:
    with open_connector(url) as conn:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                conn.write(f"{model}/{path.relative_to(src).as_posix()}", path.read_bytes())


@pytest.mark.parametrize("command", ["publish", "index"])
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_real_repo_layout_serves_the_indexed_shards_and_engine_files_only(
    mistral_repo, reads, request, tmp_path, command, kind
):
    src, state = mistral_repo
    url = _store(kind, request, tmp_path)
    if command == "publish":
        result = rl.publish(src, url, "m", max_tp=2, max_file_bytes=CAP)
    else:
        _upload(src, url, "m")
        reads.clear()
        result = rl.index(url, "m", max_tp=2, max_file_bytes=CAP)

    assert set(result.files) == ENGINE_FILES
    assert {s.name for s in result.skipped} == set(SKIPPED)
    for s in result.skipped:
        assert SKIPPED[s.name] in s.reason, s
    assert next(s for s in result.skipped if s.name == "big_unrelated.tar").nbytes == 4 << 20
    # nothing skipped was ever read (publish reads the shards' bytes through a memory map, not the connector)
    touched = {k.split("/", 1)[1] if command == "index" else k for k in reads}
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors"} <= touched
    assert not touched & {*SKIPPED, "original/consolidated.00.pth", "original/params.json"}, touched
    assert {k for k in touched if k.endswith(".safetensors")} <= {f"model-0000{i}-of-00003.safetensors"
                                                                  for i in (1, 2, 3)}

    manifest = rl.inspect(url, "m")
    assert sorted(manifest["files"]) == sorted(ENGINE_FILES) and {t["name"] for t in manifest["tensors"]} == set(state)
    assert rl.verify(url, "m").ok
    pulled = rl.pull_files(url, "m", tmp_path / "engine")
    assert {p.name: p.read_bytes() for p in pulled} == {n: (src / n).read_bytes() for n in ENGINE_FILES}
    shards = [rl.load_shard("m", url, 2, rank, device="cpu") for rank in range(2)]
    assert_shards_match(state, [(s.tensors, s.metadata) for s in shards])


def test_cli_publish_lists_what_it_skipped(mistral_repo, tmp_path, capsys):
    src, _ = mistral_repo
    assert main(["publish", str(src), f"file://{tmp_path}/store", "--model", "m", "--max-tp", "2",
                 "--max-file-bytes", str(CAP)]) == 0
    out = capsys.readouterr().out
    assert "files for pull-files: chat_template.jinja, config.json," in out
    assert f"skipped {len(SKIPPED)} (not read):" in out
    assert "consolidated.safetensors (" in out and "never read" in out
    assert "original/: folder" in out and "big_unrelated.tar (4.19 MB): not a file an engine needs" in out


def test_repo_without_hf_safetensors_names_what_it_found(tmp_path, mistral_repo):
    src = tmp_path / "native"
    src.mkdir()
    for name in ("config.json", "consolidated.safetensors", "pytorch_model.bin"):
        (src / name).write_bytes((mistral_repo[0] / name).read_bytes())
    with pytest.raises(rl.ConfigError, match=r"no \*\.safetensors files to serve .*found consolidated\.safetensors, "
                                              r"pytorch_model\.bin, which are never read"):
        rl.publish(src, f"file://{tmp_path}/store", "m")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(rl.ConfigError, match=r"index\.json names files that are missing: \['model-1\.safetensors'\]"):
        rl.publish(src, f"file://{tmp_path}/store", "m")


# ------------------------------------------------------------------------------------------ zero-size tensors
ZERO = {  # names the llama preset cuts: every style, a zero on each dim
    "model.layers.0.zero.gate_proj.weight": (0, 64),  # colwise, split dim 0 is empty
    "model.layers.0.zero.up_proj.weight": (128, 0),  # colwise, the other dim is empty
    "model.layers.0.zero.down_proj.weight": (64, 0),  # rowwise, split dim 1 is empty
    "model.layers.1.zero.down_proj.weight": (0, 128),  # rowwise, rows are empty (strided in place)
    "model.zero_norm.weight": (0,),  # replicated
    "model.zero3d_norm.weight": (3, 0, 2),
}


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    src = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("zero") / "llama", dtype=torch.bfloat16)
    state = load_file(src / "model.safetensors")
    state.update({n: torch.empty(shape, dtype=torch.bfloat16) for n, shape in ZERO.items()})
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    return src, state


@pytest.mark.parametrize("command", ["publish", "index"])
@pytest.mark.parametrize("kind", ["file", "redis"])
def test_zero_size_tensors_publish_index_and_load(zero_checkpoint, request, tmp_path, command, kind):
    src, state = zero_checkpoint
    url = _store(kind, request, tmp_path)
    if command == "publish":
        rl.publish(src, url, "z", max_tp=4)
    else:
        _upload(src, url, "z")
        rl.index(url, "z", max_tp=4)
    summary = rl.inspect(url, "z", tp=4)
    assert summary["served_tp"] == [1, 2, 4]
    assert {t["name"]: t["bytes"] for t in summary["tensors"] if t["name"] in ZERO} == dict.fromkeys(ZERO, 0)
    assert rl.verify(url, "z").ok
    for tp in (1, 4):
        shards = [rl.load_shard("z", url, tp, rank, device="cpu", verify="full") for rank in range(tp)]
        assert_shards_match(state, [(s.tensors, s.metadata) for s in shards])
        assert all(s.report.digest == s.report.expected_digest for s in shards)
    assert [tuple(shards[3].tensors[n].shape) for n in ZERO] == [(0, 64), (32, 0), (64, 0), (0, 32), (0,), (3, 0, 2)]
