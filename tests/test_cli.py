"""The command line: publish -> inspect -> verify on a file store, exit codes, one-line errors, no secrets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import raydist_loader
from raydist_loader.cli import main
from raydist_loader.report import PHASES, LoadReport, Phase, RankReport
from raydist_loader.store.manifest import Manifest
from raydist_loader.testing.tiny_models import make_tiny_checkpoint
from tests.conftest import free_port
from tests.shards import stored_manifest

MODEL = "tiny-llama"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def store(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file store holding the tiny llama, published through the CLI (never modified by the tests)."""
    root = tmp_path_factory.mktemp("store")
    assert main(["publish", str(checkpoint), f"file://{root}", "--model", MODEL, "--max-tp", "2"]) == 0
    return root


@pytest.fixture
def store_copy(store: Path, tmp_path: Path) -> Path:
    """A private copy of the store that a test may damage."""
    return Path(shutil.copytree(store, tmp_path / "store"))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "raydist_loader", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("publish", "index", "inspect", "verify", "gc", "load", "pull-files"):
        assert command in proc.stdout


def test_inspect_does_not_import_ray(store: Path):
    code = ("import sys; from raydist_loader.cli import main; "
            f"rc = main(['inspect', {str(store)!r}, '--model', {MODEL!r}, '--tp', '2']); "
            "print('RAY' if 'ray' in sys.modules else 'NO-RAY'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO-RAY")


def test_publish_json(checkpoint: Path, tmp_path: Path, capsys):
    code, out, err = run(capsys, "publish", str(checkpoint), str(tmp_path / "s"), "--model", MODEL,
                         "--max-tp", "2", "--blake3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == MODEL and result["layout"] == "chunked" and result["tensors"] > 0
    assert result["bytes"] > 0 and "gbps" in result and result["version"].startswith("v")
    manifest = json.loads(stored_manifest(f"file://{tmp_path}/s", MODEL))
    assert "blake3" in manifest["digests"]


def test_publish_text(checkpoint: Path, tmp_path: Path, capsys):
    code, out, _ = run(capsys, "publish", str(checkpoint), f"file://{tmp_path}/s", "--model", MODEL,
                       "--max-tp", "2")
    assert code == 0
    assert out.startswith(f"published {MODEL} version v") and "tensors" in out


def test_inspect_per_rank_bytes(store: Path, capsys):
    code, out, err = run(capsys, "inspect", f"file://{store}", "--model", MODEL, "--tp", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == MODEL and summary["tp"] == 2 and 2 in summary["served_tp"]
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["bytes"] > 0 for r in ranks)
    replicated = ranks[0]["replicated_bytes"]
    # each rank moves about half the split bytes plus every replicated byte
    split_total = summary["bytes"] - replicated
    assert sum(r["split_bytes"] for r in ranks) == split_total
    assert all(abs(r["split_bytes"] - split_total / 2) < 0.02 * split_total for r in ranks)

    code, text, _ = run(capsys, "inspect", f"file://{store}", "--model", MODEL, "--tp", "2")
    assert code == 0
    assert f"model {MODEL} version {summary['version']}" in text
    assert "at tp=2:" in text  # not swallowed by redaction
    assert "model.embed_tokens.weight" in text


def test_verify_ok(store: Path, capsys):
    code, out, err = run(capsys, "verify", f"file://{store}", "--model", MODEL)
    assert code == 0, err
    assert out.startswith(f"verified {MODEL}") and "all digests match" in out
    code, out, _ = run(capsys, "verify", str(store), "--model", MODEL, "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] is True and result["failures"] == [] and result["chunks"] > 0


def _flip_one_byte(store: Path, tensor: str) -> str:
    manifest = Manifest.from_json(stored_manifest(str(store), MODEL))
    chunk = manifest.chunks(tensor)[-1]
    part = chunk.parts[0]
    path = store / part.object
    data = bytearray(path.read_bytes())
    data[part.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return chunk.id


def test_verify_names_the_corrupt_tensor_and_chunk(store_copy: Path, capsys):
    tensor = "model.embed_tokens.weight"
    chunk = _flip_one_byte(store_copy, tensor)
    code, out, err = run(capsys, "verify", f"file://{store_copy}", "--model", MODEL)
    assert code == 1
    assert f"tensor {tensor} chunk {chunk}: digest" in out
    assert "!= expected" in out and "***" not in out  # the digests are shown, not redacted away
    assert "1 of" in err and "failed verification" in err and "Traceback" not in err

    code, out, _ = run(capsys, "verify", f"file://{store_copy}", "--model", MODEL, "--json")
    assert code == 1
    failures = json.loads(out)["failures"]
    assert [(f["tensor"], f["chunk"]) for f in failures] == [(tensor, chunk)]


def test_missing_model_says_publish(store: Path, capsys):
    code, out, err = run(capsys, "inspect", f"file://{store}", "--model", "nope")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydist-loader: error: ")
    assert "publish" in lines[0] and "nope" in lines[0]
    for command in ("verify", "gc"):
        code, _, err = run(capsys, command, str(store), "--model", "nope")
        assert code == 2 and "publish" in err and "Traceback" not in err


def test_unknown_scheme_lists_known_schemes(capsys):
    code, out, err = run(capsys, "inspect", "ftp://host/models", "--model", MODEL)
    assert code == 2 and out == ""
    assert "known schemes: file, redis, rediss, s3" in err and "Traceback" not in err


def test_inline_url_password_never_printed(capsys):
    secret = "Sup3rSecretPw"
    url = f"redis://loader:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens: the store fails
    for argv in (["inspect", url, "--model", MODEL], ["verify", url, "--model", MODEL, "--json"],
                 ["gc", url, "--model", MODEL], ["load", url, "--model", MODEL, "--tp", "0"],
                 ["inspect", f"ftp://u:{secret}@h/x", "--model", MODEL]):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert secret not in out + err
        assert "Traceback" not in err
    code, _, err = run(capsys, "inspect", url, "--model", MODEL)
    assert "--password-env" in err and "loader:***@" in err


def test_password_env(capsys, monkeypatch: pytest.MonkeyPatch):
    secret = "EnvPassw0rd"
    monkeypatch.setenv("RAYDIST_CLI_PW", secret)
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, out, err = run(capsys, "inspect", url, "--model", MODEL, "--password-env", "RAYDIST_CLI_PW")
    assert code == 2 and secret not in out + err
    monkeypatch.delenv("RAYDIST_CLI_PW")
    code, _, err = run(capsys, "inspect", url, "--model", MODEL, "--password-env", "RAYDIST_CLI_PW")
    assert code == 2 and "RAYDIST_CLI_PW is not set" in err


def test_password_env_reaches_the_connector(store: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    seen = {}

    def fake_inspect(url, model, *, tp=None, connector_options=None, **_):
        seen.update(connector_options or {})
        return {"echo": connector_options["password"]}

    monkeypatch.setattr("raydist_loader.store.summary.inspect", fake_inspect)
    monkeypatch.setenv("RAYDIST_CLI_PW", "pw-123")
    code, out, _ = run(capsys, "inspect", str(store), "--model", MODEL, "--password-env", "RAYDIST_CLI_PW",
                       "--json")
    assert code == 0 and seen == {"password": "pw-123"}
    assert "pw-123" not in out and json.loads(out) == {"echo": "***"}


def test_index_in_place_then_verify(checkpoint: Path, tmp_path: Path, capsys):
    root = tmp_path / "hf"
    shutil.copytree(checkpoint, root / MODEL)
    code, out, err = run(capsys, "index", str(root), "--model", MODEL, "--max-tp", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["layout"] == "inplace"
    code, _, err = run(capsys, "verify", str(root), "--model", MODEL)
    assert code == 0, err


def test_gc_dry_run_keeps_the_current_version(store: Path, capsys):
    code, out, err = run(capsys, "gc", str(store), "--model", MODEL, "--grace", "0", "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["deleted"] == [] and any(result["current"] in k for k in result["kept"])
    code, out, _ = run(capsys, "gc", str(store), "--model", MODEL, "--dry-run")
    assert code == 0 and "would delete 0 version(s)" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "required"),
        (["publish"], "required"),
        (["inspect", "/tmp/x"], "--model"),
        (["inspect", "/tmp/x", "--model", MODEL, "--tp", "0"], "--tp: expected an integer in [1, 1024]"),
        (["load"], "give URL --model NAME --tp N, or --config FILE"),
        (["load", "/tmp/x", "--model", MODEL], "missing --tp"),
        (["load", "--tp", "2", "--model", MODEL], "missing URL"),
        (["load", "/tmp/x", "--config", "configs/local-demo.yaml"], "either URL or --config"),
        (["load", "--config", "no/such.yaml"], "does not exist"),
        (["load", "/tmp/x", "--model", MODEL, "--tp", "2", "--device", "gpu"], "invalid choice: 'gpu'"),
        (["load", "/tmp/x", "--model", MODEL, "--tp", "2", "--verify", "--no-verify"], "not allowed with"),
        (["release"], "the following arguments are required: --model"),
    ],
)
def test_usage_errors_exit_2_before_any_work(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_load_config_errors_name_the_key(tmp_path: Path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: m\nstore: {url: /tmp/x}\nload:\n  tp: 2\n  placment: spread\n")
    code, _, err = run(capsys, "load", "--config", str(cfg))
    assert code == 2 and "load.placment: unknown key" in err and str(cfg) in err


def test_load_config_missing_password_env(capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    code, _, err = run(capsys, "load", "--config", str(REPO / "configs" / "redis.yaml"))
    assert code == 2 and "REDIS_PASSWORD is not set" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "load", "--help")
    assert code == 0 and "--config" in out and "--verify-full" in out


# ------------------------------------------------------------------------------------------ load wiring
class _FakeLoaded:
    namespace, ray_address = "raydist", "10.0.0.1:6379"

    def __init__(self, report: LoadReport):
        self.report = report
        self.model = report.model
        self.names = [f"raydist:{report.model}:{r.rank}" for r in report.ranks]
        self.shut = False

    def shutdown(self) -> None:
        self.shut = True

    def hold(self) -> None:
        raise KeyboardInterrupt


def _fake_api(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Stand-in for raydist_loader.api (the real one needs Ray): records the call, returns a small report."""
    calls: dict = {}

    def load_across_cluster(model, url, **kwargs):
        calls.update(model=model, url=url, **kwargs)
        ranks = [RankReport(rank=r, tp=kwargs["tp"], model=model, version="v1", host="node-a", node_id="n1",
                            gpu_ids=[str(r)], device="cpu", store=url, bytes=1000, bytes_read=1000, staged_bytes=0,
                            chunks=3, started=100.0, finished=100.5, seconds=0.5, gbps=0.002, verify=True,
                            digest="d", expected_digest="d") for r in range(kwargs["tp"])]
        phases = [Phase(name, i / 2, (i + 1) / 2) for i, name in enumerate(PHASES)]
        report = LoadReport.gather(ranks, ready_s=2.0, verified=True, phases=phases)
        calls["loaded"] = _FakeLoaded(report)
        return calls["loaded"]

    fake = types.ModuleType("raydist_loader.api")
    fake.load_across_cluster = load_across_cluster
    monkeypatch.setitem(sys.modules, "raydist_loader.api", fake)
    monkeypatch.setattr(raydist_loader, "api", fake, raising=False)
    return calls


def test_load_flags_override_the_config(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    calls = _fake_api(monkeypatch)
    monkeypatch.setenv("REDIS_PASSWORD", "cfg-secret-pw")
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "load", "--config", str(REPO / "configs" / "redis.yaml"), "--tp", "2",
                         "--placement", "spread", "--verify-full", "--report", str(report), "--no-progress",
                         "--ray-address", "local", "--timeout", "30")
    assert code == 0, err
    assert calls["model"] == "llama-3-8b" and calls["url"] == "redis://loader@redis.internal:6379/0"
    assert (calls["tp"], calls["placement"], calls["verify"]) == (2, "spread", "full")
    assert calls["concurrency"] == 2  # from the file
    assert (calls["ray_address"], calls["timeout_s"], calls["progress"]) == ("local", 30.0, False)
    assert calls["connector_options"] == {"password": "cfg-secret-pw"}
    assert calls["loaded"].shut and calls["hold"] is False
    written = json.loads(report.read_text())
    assert written["tp"] == 2 and len(written["ranks"]) == 2
    lines = out.splitlines()
    assert lines[0].startswith("llama-3-8b version v1 tp=2") and "verified" in lines[0]
    assert lines[1].split() == ["rank", "host", "gpu", "device", "bytes", "read", "seconds", "GB/s", "digest"]
    assert lines[2].split()[:2] == ["0", "node-a"] and lines[2].endswith("ok")
    assert lines[-2] == ("call to verified 3.00 s: manifest 0.50 s, connect 0.50 s, placement 0.50 s, "
                         "actors 0.50 s, pull 0.50 s, verify 0.50 s")
    assert [p["name"] for p in written["phases"]] == list(PHASES)
    assert "cfg-secret-pw" not in out + err + report.read_text()


def test_load_without_config_and_hold(capsys, monkeypatch: pytest.MonkeyPatch):
    calls = _fake_api(monkeypatch)
    code, out, err = run(capsys, "load", "/tmp/store", "--model", MODEL, "--tp", "1", "--hold", "--json")
    assert code == 0, err
    assert (calls["device"], calls["placement"], calls["verify"], calls["connector_options"]) == (
        "auto", "pack", True, {})
    assert json.loads(out)["verified"] is True
    assert calls["hold"] is True and "Ctrl-C" in err and "released" in err and calls["loaded"].shut
    assert f"holding raydist:{MODEL}:0 in Ray namespace 'raydist' on cluster 10.0.0.1:6379" in err
    assert f"raydist-loader release --model {MODEL} --ray-address 10.0.0.1:6379" in err


def test_pull_files_writes_config_and_tokenizer_never_weights(store: Path, checkpoint: Path, tmp_path: Path, capsys):
    dest = tmp_path / "engine-dir"
    code, out, err = run(capsys, "pull-files", f"file://{store}", "--model", MODEL, str(dest))
    assert code == 0, err
    expected = sorted(p.name for p in checkpoint.iterdir() if not p.name.endswith(".safetensors"))
    assert sorted(p.name for p in dest.iterdir()) == sorted([*expected, "raydist.json"]) and "config.json" in expected
    assert all((dest / n).read_bytes() == (checkpoint / n).read_bytes() for n in expected)
    assert out.startswith(f"wrote {len(expected)} file(s) of {MODEL} to {dest}: ")
    assert out.rstrip().endswith("; and raydist.json (where the weights are)")
    assert json.loads((dest / "raydist.json").read_text()) == {"url": f"file://{store}", "model": MODEL}
    code, _, err = run(capsys, "pull-files", str(store), "--model", "nope", str(tmp_path / "other"))
    assert code == 2 and err.startswith("raydist-loader: error: model 'nope' not found")
