"""Security: Redis ACL users and TLS on real servers, S3 credentials from the environment only, secrets kept out of
errors, reprs, reports and everything the CLI prints, no unsafe deserialisation in the package, and tamper evidence
(blake3 digests + a pinned manifest sha256)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import raydist_loader as rl
from raydist_loader import digest
from raydist_loader.connectors.redis import RedisConnector
from raydist_loader.driver.coordinator import Coordinator, LoadOptions
from raydist_loader.errors import BackendError, VerificationError
from raydist_loader.load.worker import ShardLoader
from raydist_loader.store.manifest import Manifest, manifest_key
from raydist_loader.store.versions import read_manifest, read_manifest_bytes
from raydist_loader.testing import faulty

from .shards import assert_shards_match, original_tensors, single_manifest_layout

PACKAGE = Path(rl.__file__).resolve().parent
PW = "Tr0ub4dor-s3cret-91d2"
WRONG = "not-the-Pw-5521"
# an ACL user with full access, and one that may only touch keys under other/
ACL = ("--user", "loader", "on", f">{PW}", "~*", "+@all", "--user", "reader", "on", f">{PW}", "~other/*", "+@all")


@pytest.fixture(scope="module")
def ckpts(two_llamas):
    return two_llamas


@pytest.fixture
def acl_server(start_redis, ckpts):
    """A redis-server with ACL users and model 'm' published through user 'loader'."""
    server = start_redis(*ACL)
    base = f"redis://loader@127.0.0.1:{server.port}/0"
    rl.publish(ckpts[0], base, "m", max_tp=2, connector_options={"password": PW})
    return server, base


def _load_both_ranks(url, **options):
    return [rl.load_shard("m", url, 2, r, device="cpu", connector_options=options or None) for r in range(2)]


# --------------------------------------------------------------------------------------------- Redis auth
def test_acl_user_with_the_right_password_loads_and_verifies(acl_server, ckpts):
    server, base = acl_server
    shards = _load_both_ranks(base, password=PW)
    assert_shards_match(original_tensors(ckpts[0]), [(s.tensors, s.metadata) for s in shards])
    inline = f"redis://loader:{PW}@127.0.0.1:{server.port}/0"
    shard = rl.load_shard("m", inline, 2, 1, device="cpu")
    assert shard.report.store == f"redis://loader:***@127.0.0.1:{server.port}/0"
    assert PW not in json.dumps(shard.report, default=str)
    assert rl.verify(base, "m", connector_options={"password": PW}).ok


@pytest.mark.parametrize(
    "how",
    ["wrong-password-inline", "wrong-password-option", "unknown-user", "no-password", "no-permission"],
)
def test_auth_failures_are_one_clear_error_without_any_password(acl_server, how):
    server, _ = acl_server
    host = f"127.0.0.1:{server.port}/0"
    url, options = {
        "wrong-password-inline": (f"redis://loader:{WRONG}@{host}", {}),
        "wrong-password-option": (f"redis://loader@{host}", {"password": WRONG}),
        "unknown-user": (f"redis://nobody:{PW}@{host}", {}),
        "no-password": (f"redis://loader@{host}", {}),
        "no-permission": (f"redis://reader@{host}", {"password": PW}),  # its ACL allows only other/*
    }[how]
    with pytest.raises(BackendError) as info:
        rl.load_shard("m", url, 2, 0, device="cpu", connector_options=options or None)
    msg = str(info.value)
    user = {"unknown-user": "nobody", "no-permission": "reader"}.get(how, "loader")
    assert f"authentication failed for user {user!r}" in msg, msg
    assert "check the username and password" in msg and "ACL" in msg
    assert f"127.0.0.1:{server.port}" in msg, "the error names the backend"
    assert PW not in msg and WRONG not in msg and PW not in repr(info.value) and WRONG not in repr(info.value)
    assert info.value.transient is False, "auth failures are permanent: never retried"


# --------------------------------------------------------------------------------------------- Redis TLS
def test_rediss_tls_with_an_acl_user_publish_load_verify(start_redis, tls_files, ckpts):
    server = start_redis(*ACL, tls=tls_files)
    url = f"rediss://loader@127.0.0.1:{server.port}/0?ssl_ca_certs={tls_files.cert}"
    opts = {"password": PW}
    rl.publish(ckpts[1], url, "m", max_tp=2, connector_options=opts)
    shards = _load_both_ranks(url, **opts)
    assert_shards_match(original_tensors(ckpts[1]), [(s.tensors, s.metadata) for s in shards])
    assert all(s.report.store.startswith("rediss://loader@127.0.0.1") for s in shards)
    assert rl.verify(url, "m", connector_options=opts).ok

    # the server's certificate must verify: without the CA file the client refuses
    with pytest.raises(BackendError, match=r"certificate verify failed") as info:
        rl.load_shard("m", f"rediss://loader@127.0.0.1:{server.port}/0", 2, 0, device="cpu", connector_options=opts)
    assert f"rediss://loader@127.0.0.1:{server.port}/0" in str(info.value) and PW not in str(info.value)


def test_rediss_with_an_untrusted_certificate_is_a_permanent_error_with_a_hint(start_redis, tls_files):
    server = start_redis(tls=tls_files)
    with pytest.raises(BackendError, match=r"TLS certificate verification failed .*ssl_ca_certs") as info:
        rl.load_shard("m", f"rediss://127.0.0.1:{server.port}/0", 2, 0, device="cpu")
    assert info.value.transient is False


# --------------------------------------------------------------------------------------------- S3 credentials
def _source_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_credentials_in_the_package_source():
    pattern = re.compile(r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token)\s*=|AKIA[0-9A-Z]{16}")
    hits = [f"{p.relative_to(PACKAGE)}:{n}" for p in _source_files()
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"credentials must come from boto3's chain (env, profile), never code: {hits}"


@pytest.fixture
def no_aws_env(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def test_s3_credentials_come_from_the_environment_or_a_profile(s3_server, ckpts, no_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"s3://{s3_server.make_bucket(f'sec-{uuid.uuid4().hex[:8]}')}/store"
    rl.publish(ckpts[0], url, "m", max_tp=2)  # from the environment
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    with pytest.raises(BackendError, match=r"no usable AWS credentials .*AWS_ACCESS_KEY_ID.*AWS_PROFILE"):
        rl.load_shard("m", url, 2, 0, device="cpu")

    creds = no_aws_env / "credentials"
    creds.write_text("[loader]\naws_access_key_id = testing\naws_secret_access_key = profile-secret-77\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "loader")
    shard = rl.load_shard("m", url, 2, 1, device="cpu")  # from a profile
    assert not shard.report.failures
    assert "profile-secret-77" not in json.dumps(shard.report, default=str)
    with rl.open_connector(url) as conn:
        assert "profile-secret-77" not in repr(conn) and "testing" not in repr(conn)


# --------------------------------------------------------------------------------------------- reprs, reports
def test_reprs_never_show_the_password(acl_server):
    server, base = acl_server
    inline = f"redis://loader:{PW}@127.0.0.1:{server.port}/0"
    with RedisConnector(inline) as conn:
        raw = read_manifest_bytes(conn, "m")[1]
        assert PW not in repr(conn) and PW not in conn.describe()
        assert PW not in repr(conn._target) and PW not in repr(conn._endpoint)
    with RedisConnector(base, password=PW) as conn:
        assert PW not in repr(conn) and PW not in repr(conn._target)
    faulty.FaultyConnector.register()
    try:
        with rl.open_connector(f"faulty+{inline}?delay_ms=1") as conn:
            assert PW not in repr(conn) and "loader:***@" in repr(conn)
    finally:
        from raydist_loader import connectors

        for scheme in faulty.SCHEMES:
            connectors._registered.pop(f"faulty+{scheme}", None)
    loader = ShardLoader(inline, raw, 2, 0, device="cpu", connector_options={"password": PW})
    try:
        report = loader.load()
        assert PW not in repr(loader) and PW not in json.dumps(report, default=str)
    finally:
        loader.close()
    manifest = Manifest.from_json(raw)
    coordinator = Coordinator(manifest, raw, inline, 2, LoadOptions(), {"password": PW})  # no Ray needed
    assert PW not in repr(coordinator) and "loader:***@" in repr(coordinator)


# --------------------------------------------------------------------------------------------- the CLI
def _cli(*args: str, env_extra: dict | None = None) -> tuple[list[str], dict]:
    """``python -m raydist_loader ARGS`` and its environment, to run with :func:`_run_all`."""
    return [sys.executable, "-m", "raydist_loader", *args], {**os.environ, **(env_extra or {})}


def _run_all(commands: dict[str, tuple[list[str], dict]], at_once: int = 4) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands, ``at_once`` at a time (most of a run is importing torch: ~0.5 GB, a second of CPU each);
    each run's output is its own."""
    done: dict[str, subprocess.CompletedProcess] = {}
    names = list(commands)
    for start in range(0, len(names), at_once):
        batch = {n: subprocess.Popen(commands[n][0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=commands[n][1]) for n in names[start:start + at_once]}
        for name, proc in batch.items():
            stdout, stderr = proc.communicate(timeout=120)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


def test_the_cli_never_prints_the_password(acl_server, ckpts):
    server, base = acl_server
    inline = f"redis://loader:{PW}@127.0.0.1:{server.port}/0"
    wrong_inline = f"redis://loader:{WRONG}@127.0.0.1:{server.port}/0"
    env = {"STORE_PW": PW, "BAD_PW": WRONG}
    runs = {
        "inspect-inline": (_cli("inspect", inline, "--model", "m", "--tp", "2"), 0),
        "inspect-env-json-vv": (_cli("-vv", "inspect", base, "--model", "m", "--json", "--password-env", "STORE_PW",
                                     env_extra=env), 0),
        "verify-env": (_cli("-v", "verify", base, "--model", "m", "--password-env", "STORE_PW", env_extra=env), 0),
        "publish-env": (_cli("-v", "publish", str(ckpts[1]), base, "--model", "m2", "--max-tp", "2", "--blake3",
                             "--password-env", "STORE_PW", env_extra=env), 0),
        "gc-env": (_cli("gc", base, "--model", "m", "--dry-run", "--password-env", "STORE_PW", env_extra=env), 0),
        "inspect-wrong-inline": (_cli("inspect", wrong_inline, "--model", "m"), 2),
        "verify-wrong-env": (_cli("verify", base, "--model", "m", "--password-env", "BAD_PW", env_extra=env), 2),
        "inspect-missing-model": (_cli("inspect", inline, "--model", "nope"), 2),
    }  # side by side: they touch different models (m2 is published) or only read
    finished = _run_all({name: command for name, (command, _) in runs.items()})
    runs = {name: (finished[name], status) for name, (_, status) in runs.items()}
    for name, (proc, status) in runs.items():
        printed = proc.stdout + proc.stderr
        assert proc.returncode == status, f"{name}: rc={proc.returncode}\n{printed}"
        assert PW not in printed and WRONG not in printed, f"{name} printed a password:\n{printed}"
        assert "Traceback" not in printed, f"{name}: user errors get one line, not a traceback\n{printed}"
    assert "inline password" in runs["inspect-inline"][0].stderr, "an inline password is warned about"
    assert "loader:***@" in runs["inspect-inline"][0].stdout + runs["inspect-inline"][0].stderr
    for name in ("inspect-wrong-inline", "verify-wrong-env"):
        err = runs[name][0].stderr
        assert "authentication failed for user 'loader'" in err, err
    assert json.loads(runs["inspect-env-json-vv"][0].stdout)
    assert rl.verify(base, "m2", connector_options={"password": PW}).ok


# --------------------------------------------------------------------------------------------- package hygiene
_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _banned_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[-1] in _BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[-1] in _BANNED_MODULES or any(a.name in _BANNED_MODULES for a in node.names):
                found.append(f"{where} from {mod} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in {"eval", "exec", "__import__"}:
                found.append(f"{where} {f.id}(")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if (f.value.id, f.attr) in {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                                            ("yaml", "full_load"), ("builtins", "eval"), ("builtins", "exec")}:
                    found.append(f"{where} {f.value.id}.{f.attr}(")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                found.append(f"{where} allow_pickle=")
            if any(k.arg == "weights_only" for k in node.keywords):
                found.append(f"{where} weights_only= (a torch.load)")
    return found


def test_no_pickle_torch_load_eval_or_exec_in_the_package():
    files = _source_files()
    assert len(files) > 20
    found = [hit for p in files for hit in _banned_uses(p)]
    assert not found, f"unsafe deserialisation / code execution in the package: {found}"


def test_the_checker_catches_each_banned_use(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom ray import cloudpickle\nimport torch, yaml, numpy as np\n"
                   "torch.load('x')\neval('1')\nexec('x=1')\nyaml.load('a')\nnp.load('f', allow_pickle=True)\n")
    hits = _banned_uses(bad)
    assert len(hits) == 7, hits


def test_the_product_never_imports_its_test_helpers():
    """raydist_loader.testing (tiny models, the faulty+ connector) serves tests; no product module depends on it."""
    hits = []
    for path in _source_files():
        if path.is_relative_to(PACKAGE / "testing"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # a relative import is taken from the package root
                base = ".".join(["raydist_loader"] * bool(node.level) + [node.module] * bool(node.module))
                modules = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            if any(m.startswith("raydist_loader.testing") for m in modules):
                hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not hits, f"product modules import raydist_loader.testing: {hits}"


# --------------------------------------------------------------------------------------------- tamper evidence
def test_blake3_digests_are_recorded_and_checked(tmp_path, ckpts):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpts[0], url, "m", max_tp=2, digests=("xxh3_128", "blake3"))
    with rl.open_connector(url) as conn:
        manifest = read_manifest(conn, "m")
        assert manifest.digests == ["xxh3_128", "blake3"]
        chunks = [c for n in manifest.tensors for c in manifest.chunks(n)]
        assert chunks and all(c.blake3 and len(c.blake3) == 64 for c in chunks)
        assert all(f.blake3 for f in manifest.files.values())
        for c in chunks[:5]:  # the recorded blake3 is of the chunk's stored bytes
            data = b"".join(conn.read(p.object)[p.offset : p.offset + p.nbytes] for p in c.parts)
            assert digest.blake3_hex(data) == c.blake3
    assert rl.verify(url, "m").ok


def test_a_pinned_manifest_sha256_refuses_a_swapped_or_rewritten_store(tmp_path, ckpts):
    url = f"file://{tmp_path}/store"
    rl.publish(ckpts[0], url, "m", max_tp=2, digests=("xxh3_128", "blake3"))
    pinned = rl.manifest_sha256(url, "m")
    assert rl.load_shard("m", url, 2, 0, device="cpu", expect_manifest_sha256=pinned).report.digest

    # someone with write access re-publishes other weights: digests agree with the new bytes, only the pin catches it
    rl.publish(ckpts[1], url, "m", max_tp=2, digests=("xxh3_128", "blake3"))
    with pytest.raises(VerificationError, match=r"manifest at .* has sha256 [0-9a-f]{64}, not the expected"):
        rl.load_shard("m", url, 2, 0, device="cpu", expect_manifest_sha256=pinned)
    unpinned = rl.load_shard("m", url, 2, 0, device="cpu")
    assert torch.equal(unpinned.tensors["model.norm.weight"], original_tensors(ckpts[1])["model.norm.weight"])

    # or rewrites one chunk and patches its digests in the manifest to match
    with rl.open_connector(url) as conn:
        raw = read_manifest_bytes(conn, "m")[1]
        doc = json.loads(raw)
        name = "model.layers.0.self_attn.q_proj.weight"
        chunk = Manifest.from_json(raw).chunks(name)[0]
        part = chunk.parts[0]
        blob = bytearray(conn.read(part.object))
        blob[part.offset] ^= 0xFF
        conn.write(part.object, bytes(blob))
        data = bytes(blob[part.offset : part.offset + chunk.nbytes])
        doc["tensors"][name]["xxh3"][0], doc["tensors"][name]["blake3"][0] = digest.xxh3(data), digest.blake3_hex(data)
        conn.write(manifest_key("m"), json.dumps(doc).encode())
    pinned_b = __import__("hashlib").sha256(raw).hexdigest()
    assert rl.load_shard("m", url, 2, 0, device="cpu").report.digest, "undetectable without a pin"
    with pytest.raises(VerificationError, match="not the expected"):
        rl.load_shard("m", url, 2, 0, device="cpu", expect_manifest_sha256=pinned_b)


def test_a_load_checks_blake3_where_the_manifest_records_it(tmp_path, ckpts):
    """Bytes whose xxh3 matches but blake3 does not (a forged xxh3 collision) fail the load, naming the chunk."""
    import json

    url = f"file://{tmp_path}/store"
    rl.publish(ckpts[0], url, "m", max_tp=2, digests=("xxh3_128", "blake3"))
    single_manifest_layout(url, "m")  # the manifest edited in place at <model>/manifest.json
    path = tmp_path / "store" / "m" / "manifest.json"
    raw = json.loads(path.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    raw["tensors"][name]["blake3"][0] = "0" * 64  # what a forged collision looks like to the loader
    path.write_text(json.dumps(raw))
    with pytest.raises(VerificationError, match=rf"rank 0: tensor {name} chunk all.0"):
        rl.load_shard("m", url, 2, 0, device="cpu")
    assert rl.load_shard("m", url, 2, 1, device="cpu").report.failures == []
