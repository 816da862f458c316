"""Operations on a real store (issue 11): gc's grace period, copied models, publishes that fail, one-line CLI errors."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

import raydist_loader as rl
from raydist_loader import connectors
from raydist_loader.cli import main
from raydist_loader.connectors import open_connector
from raydist_loader.errors import BackendError
from raydist_loader.testing import faulty
from raydist_loader.testing.tiny_models import make_tiny_checkpoint
from tests.conftest import free_port

SECRET = "s3cr3t-Value-42"
# the package exports the function by this name
publish_module = importlib.import_module("raydist_loader.store.publish")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama", dtype=torch.bfloat16)


@pytest.fixture
def faulty_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    """faulty+<scheme>:// in this process for one test."""
    monkeypatch.setattr(connectors, "_registered", {})
    faulty.FaultyConnector.register()


def _versions(url: str, model: str) -> set[str]:
    with open_connector(url) as conn:
        return {k.split("/")[1] for k in conn.list(f"{model}/") if k != f"{model}/manifest.json"}


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ gc
class _Killed(BaseException):
    """The publishing process died (no clean-up ran)."""


def _dead_publish(monkeypatch: pytest.MonkeyPatch, ckpt: Path, url: str, model: str) -> str:
    """A publish that dies after writing its objects, before its manifest swap; returns its version."""
    before = _versions(url, model)

    def die(*_: object) -> None:
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(publish_module, "_finish", die)
        m.setattr(publish_module.WriteLedger, "remove", lambda self: 0)
        with pytest.raises(_Killed):
            rl.publish(ckpt, url, model, max_tp=2)
    (version,) = _versions(url, model) - before
    return version


def test_gc_grace_counts_from_the_swap_and_dead_publishes_go(store_url, llama, monkeypatch):
    """A current; B's publish dies before its swap; C is published more than the grace period after B started.
    gc right after keeps A (replaced just now) and B; a publish that dies after C (D, newer than the current
    version) is kept while fresh; once the grace period has passed A, B and D go and C still verifies."""
    grace = 3.0
    a = rl.publish(llama, store_url, "m", max_tp=2).version
    b = _dead_publish(monkeypatch, llama, store_url, "m")
    time.sleep(grace)  # B's version id (stamped when its publish started) and its writes are older than the grace
    c = rl.publish(llama, store_url, "m", max_tp=2).version
    result = rl.gc(store_url, "m", grace_s=grace)
    assert result["deleted"] == [], "A stopped being current a moment ago; B may have been writing until then"
    d = _dead_publish(monkeypatch, llama, store_url, "m")
    assert d > c
    early = rl.gc(store_url, "m", grace_s=grace)  # (A and B may go now if D's publish took longer than the grace)
    assert f"m/{d}/" in early["kept"], "a version newer than the current one, written a moment ago"
    time.sleep(grace + 1.2)  # Redis dates writes with OBJECT IDLETIME: whole seconds
    result = rl.gc(store_url, "m", grace_s=grace)
    assert sorted(early["deleted"] + result["deleted"]) == [f"m/{v}/" for v in sorted((a, b, d))]
    assert result["kept"] == [f"m/{c}/"]
    assert _versions(store_url, "m") == {c}
    assert rl.verify(store_url, "m").ok


def test_the_pointer_records_when_each_version_stopped_being_current(tmp_path, llama):
    url = f"file://{tmp_path}/store"
    first = rl.publish(llama, url, "m", max_tp=2)
    second = rl.publish(llama, url, "m", max_tp=2)
    third = rl.publish(llama, url, "m", max_tp=2)
    raw = json.loads((tmp_path / "store" / "m" / "manifest.json").read_bytes())
    assert raw["version"] == third.version and list(raw["retired"]) == [first.version, second.version]
    assert raw["retired"][first.version] <= raw["retired"][second.version] == raw["since"]


# ------------------------------------------------------------------------------------------ copied models
def _copy_model(url: str, src: str, dst: str) -> None:
    """Copy every object of ``src`` to ``dst`` with the backend's own tools, as an operator would."""
    kind = urlsplit(url).scheme
    if kind == "file":
        root = Path(urlsplit(url).path)
        shutil.copytree(root / src, root / dst)
    elif kind == "redis":
        import redis

        with redis.Redis.from_url(url) as client:  # redis-cli: COPY key newkey, per key
            for key in client.scan_iter(f"{src}/*"):
                assert client.copy(key, dst.encode() + key[len(src) :])
    else:
        import boto3

        s3 = boto3.client("s3")  # aws s3 sync s3://bucket/store/src s3://bucket/store/dst
        parts = urlsplit(url)
        prefix = parts.path.strip("/") + "/"
        for obj in s3.list_objects_v2(Bucket=parts.netloc, Prefix=f"{prefix}{src}/")["Contents"]:
            rest = obj["Key"][len(prefix) + len(src) :]
            s3.copy_object(Bucket=parts.netloc, Key=f"{prefix}{dst}{rest}", CopySource=f"{parts.netloc}/{obj['Key']}")


def test_copied_model_loads_under_its_new_name(store_url, llama):
    rl.publish(llama, store_url, "orig", max_tp=2)
    want = [rl.load_shard("orig", store_url, 2, rank, device="cpu").tensors for rank in range(2)]
    _copy_model(store_url, "orig", "team/copy")
    with open_connector(store_url) as conn:
        conn.delete_prefix("orig/")  # a load of the copy that read the original's objects would now fail
    assert rl.verify(store_url, "team/copy").ok
    for rank in range(2):
        shard = rl.load_shard("team/copy", store_url, 2, rank, device="cpu")
        assert shard.report.model == "team/copy"
        assert shard.tensors.keys() == want[rank].keys()
        assert all(torch.equal(shard.tensors[n], want[rank][n]) for n in want[rank])
    pinned = rl.manifest_sha256(store_url, "team/copy")
    rl.load_shard("team/copy", store_url, 2, 0, device="cpu", expect_manifest_sha256=pinned)


# ------------------------------------------------------------------------------------------ failed publishes
def test_evicting_redis_is_refused_and_evictions_fail_the_publish(start_redis, tmp_path, capsys):
    server = start_redis("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    # ~8 MB (twice the server's memory) in values of at most 128 KB (each one fits: the server evicts, not refuses)
    ckpt = make_tiny_checkpoint("llama", tmp_path / "big", hidden_size=256, intermediate_size=1024)
    code, out, err = _run(capsys, "publish", ckpt, server.url, "--model", "m", "--max-tp", "8")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "maxmemory-policy=allkeys-lru" in err and "--allow-eviction" in err
    with server.client() as client:
        assert client.dbsize() == 0, "refused before writing anything"
    code, out, err = _run(capsys, "publish", ckpt, server.url, "--model", "m", "--max-tp", "8", "--allow-eviction")
    assert code == 2 and "published" not in out and len(err.splitlines()) == 1, err
    assert f"publish of 'm' to {server.url} failed" in err and "missing" in err
    assert "no version of 'm' is current" in err and "Traceback" not in err
    with server.client() as client:
        assert client.keys("m/*") == [], "what the publish wrote (and was not evicted) is removed"


def test_full_disk_fails_the_publish_cleanly(tmp_path, llama, capsys, faulty_schemes):
    url = f"file://{tmp_path}/store"
    current = rl.publish(llama, url, "m", max_tp=2)
    code, out, err = _run(capsys, "publish", llama, f"faulty+{url}?full_after=2", "--model", "m", "--max-tp", "2")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and f"version {current.version} stays current" in err
    assert re.search(r"removed (\d+) of the \1 object\(s\) it started to write", err)
    assert sorted(p.name for p in (tmp_path / "store" / "m").iterdir()) == sorted([current.version, "manifest.json"])
    assert not [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".tmp")]
    assert rl.verify(url, "m").ok


def test_confirm_pass_catches_an_object_lost_before_the_swap(store_url, llama, monkeypatch):
    """Whatever drops an object between its write and the swap (eviction, another writer, gc), publish notices."""
    current = rl.publish(llama, store_url, "m", max_tp=2)
    confirm = publish_module.WriteLedger.confirm

    def lose_one(self) -> None:
        self.conn.delete(sorted(self.sizes)[0])
        confirm(self)

    monkeypatch.setattr(publish_module.WriteLedger, "confirm", lose_one)
    with pytest.raises(BackendError, match=f"1 of the .* objects written.*1 missing.*{current.version} stays current"):
        rl.publish(llama, store_url, "m", max_tp=2)
    assert _versions(store_url, "m") == {current.version} and rl.verify(store_url, "m").ok


# ------------------------------------------------------------------------------------------ one-line errors
@pytest.fixture(scope="module")
def bad_inputs(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    for name, text in (("garbled", "{not json"), ("list", "[1, 2]"), ("no-type", "{}")):
        shutil.copytree(llama, root / name)
        (root / name / "config.json").write_text(text)
        shutil.copytree(root / name, root / "stores" / name / "m")  # the same checkpoint in place, for index
    return {"root": str(root), "ckpt": str(llama), "closed": f"redis://127.0.0.1:{free_port()}/0"}


_VERBS = ("inspect", "verify", "gc", "index", "load")
_BAD = [
    # (argv template, expected exit, text the one line must hold)
    *[([v, "file://relative/path", "--model", "m", *(["--tp", "2"] if v == "load" else [])], 2, "three slashes")
      for v in _VERBS],
    (["publish", "{ckpt}", "file://relative/path", "--model", "m"], 2, "three slashes"),
    (["publish", "{root}/garbled", "{root}/out", "--model", "m"], 2, "config.json is not valid JSON"),
    (["publish", "{root}/list", "{root}/out", "--model", "m"], 2, "is not a JSON object"),
    (["publish", "{root}/no-type", "{root}/out", "--model", "m"], 2, "missing model_type"),
    (["index", "{root}/stores/garbled", "--model", "m"], 2, "config.json is not valid JSON"),
    (["index", "{root}/stores/list", "--model", "m"], 2, "is not a JSON object"),
    (["load", "{root}/empty", "--model", "m", "--tp", "2", "--device", "gpu"], 2, "invalid choice: 'gpu'"),
    (["load", "{root}/empty", "--model", "m", "--tp", "0"], 2, "--tp: expected an integer in [1, 1024]"),
    (["load", "{root}/empty", "--model", "m", "--tp", "-2"], 2, "--tp: expected an integer in [1, 1024]"),
    (["inspect", "{root}/empty", "--model", "m", "--tp", "0"], 2, "--tp: expected an integer in [1, 1024]"),
    (["publish", "{ckpt}", "{root}/out", "--model", "m", "--max-tp", "0"], 2, "--max-tp: expected an integer"),
    (["index", "{root}/empty", "--model", "m", "--max-tp", "-1"], 2, "--max-tp: expected an integer"),
    *[([v, "s3://no-such-bucket/x", "--model", "m", *(["--tp", "2"] if v == "load" else [])], 2,
       "bucket 'no-such-bucket' does not exist") for v in _VERBS],
    (["publish", "{ckpt}", "s3://no-such-bucket/x", "--model", "m"], 2, "bucket 'no-such-bucket' does not exist"),
    (["publish", "{root}/empty", "{root}/out", "--model", "m"], 2, "no files at"),
    (["index", "{root}/empty", "--model", "m"], 2, "no files at"),
    *[([v, "{root}/empty", "--model", "m", *(["--tp", "2"] if v == "load" else [])], 2, "model 'm' not found")
      for v in ("inspect", "verify", "gc", "load")],
    (["inspect", "{root}/empty", "--model", "m", "--password-env", "RL_SECRET"], 2, "takes no connector options"),
    *[([v, "{closed}", "--model", "m", "--password-env", "RL_SECRET", *(["--tp", "2"] if v == "load" else [])], 2,
       "cannot reach Redis") for v in _VERBS],
    (["verify", "{root}/stores/garbled", "--model", "m", "--password-env", "NO_SUCH_VAR"], 2, "NO_SUCH_VAR is not set"),
]


@pytest.mark.parametrize("argv, code, expected", _BAD, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _, _) in
                                                              enumerate(_BAD)])
def test_every_verb_answers_bad_input_with_one_line(argv, code, expected, bad_inputs, s3_server, capsys, monkeypatch):
    monkeypatch.setenv("RL_SECRET", SECRET)
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    got, out, err = _run(capsys, *(a.format(**bad_inputs) for a in argv))
    assert got == code, err
    assert len(err.splitlines()) == 1 and err.startswith("raydist-loader"), err
    assert expected in err and "Traceback" not in err and "internal error" not in err
    assert SECRET not in out + err
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "bad input is refused before Ray starts"
