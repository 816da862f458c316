"""Deployment configs: every shipped example validates; every mistake names the file, the dotted key, what was
received and what is expected; secrets are only referenced (env var / file), never stored or echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydist_loader.config import LoadConfig, load_config, resolve_secret
from raydist_loader.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
GOOD = """\
model: llama-demo
store:
  url: redis://loader@redis.internal:6379/0
  password_env: RAYDIST_TEST_PW
load:
  tp: 8
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(source) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


def test_the_examples_directory_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"local-demo.yaml", "redis.yaml", "s3.yaml", "multinode.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path):
    config = load_config(path)
    assert isinstance(config, LoadConfig)
    assert config.model and config.store.url and config.load.tp >= 1
    assert config.source == str(path)
    # no shipped config carries a secret inline
    assert "password" not in config.store.options


def test_local_demo_is_what_the_readme_promises():
    config = load_config(next(p for p in CONFIGS if p.name == "local-demo.yaml"))
    assert (config.model, config.store.url, config.load.tp, config.load.device) == (
        "tiny-llama", "file:///tmp/raydist-demo-store", 2, "cpu")


def test_defaults(tmp_path: Path):
    config = load_config(write(tmp_path, GOOD))
    ld = config.load
    assert (ld.device, ld.placement, ld.concurrency, ld.verify, ld.rules, ld.timeout_s) == (
        "auto", "pack", None, True, None, 600.0)
    assert (ld.expect_manifest_sha256, ld.ray_address, ld.num_cpus_per_actor) == (None, None, 0.25)
    assert (config.report, config.hold, config.store.options) == (None, False, {})


def test_a_dict_is_accepted_and_verify_full():
    config = load_config({"model": "m", "store": {"url": "/tmp/x"}, "load": {"tp": 2, "verify": "full"}})
    assert config.load.verify == "full" and config.source is None


def test_unknown_key_lists_the_known_ones(tmp_path: Path):
    path = write(tmp_path, GOOD + "  tpp: 4\n")
    message = error_of(path)
    assert str(path) in message
    assert "load.tpp: unknown key; known keys: device, placement" in message and ", tp," in message
    assert f"{path}:7:" in message  # the line of the bad key


def test_unknown_top_level_key(tmp_path: Path):
    message = error_of(write(tmp_path, GOOD + "holdd: true\n"))
    assert "holdd: unknown key; known keys: model, store, load, report, hold" in message


def test_unknown_store_key(tmp_path: Path):
    message = error_of(write(tmp_path, GOOD.replace("  password_env", "  pasword_env")))
    assert "store.pasword_env: unknown key" in message and "password_env" in message


@pytest.mark.parametrize(
    "line, path, received, expected",
    [
        ("  tp: eight", "load.tp", "'eight'", "integer"),
        ("  tp: 0", "load.tp", "0", "in [1, 1024]"),
        ("  tp: true", "load.tp", "true", "integer"),
        ("  tp: 8\n  device: gpu", "load.device", "'gpu'", "'auto', 'cpu' or 'cuda'"),
        ("  tp: 8\n  placement: packed", "load.placement", "'packed'", "'strict_spread'"),
        ("  tp: 8\n  verify: maybe", "load.verify", "'maybe'", '"full"'),
        ("  tp: 8\n  concurrency: 0", "load.concurrency", "0", "in [1, 1024]"),
        ("  tp: 8\n  timeout_s: -1", "load.timeout_s", "-1", "in (0, 604800]"),
        ("  tp: 8\n  expect_manifest_sha256: abc", "load.expect_manifest_sha256", "'abc'", "64 hex"),
        ("  tp: 8\nhold: 3", "hold", "3", "boolean"),
    ],
)
def test_bad_values_name_path_received_and_expected(tmp_path: Path, line, path, received, expected):
    cfg = write(tmp_path, GOOD.replace("  tp: 8", line))
    message = error_of(cfg)
    assert str(cfg) in message
    assert f"{path}: got {received}" in message
    assert expected in message


def test_missing_required_keys(tmp_path: Path):
    message = error_of(write(tmp_path, GOOD.replace("  tp: 8\n", "  device: cpu\n")))
    assert "load.tp: required key is missing" in message
    message = error_of({"model": "m", "load": {"tp": 1}})
    assert "store: required key is missing" in message


def test_several_problems_are_all_reported(tmp_path: Path):
    message = error_of(write(tmp_path, GOOD.replace("  tp: 8", "  tp: 0\n  device: gpu")))
    assert "2 problems" in message and "load.tp" in message and "load.device" in message


def test_inline_password_is_refused_and_not_echoed(tmp_path: Path):
    cfg = write(tmp_path, GOOD.replace("loader@", "loader:Hunter2pw@"))
    message = error_of(cfg)
    assert "store.url" in message and "password_env" in message and "password_file" in message
    assert "Hunter2pw" not in message
    assert "loader:***@" in message


def test_password_env_and_file_are_exclusive(tmp_path: Path):
    text = GOOD.replace("  password_env: RAYDIST_TEST_PW\n",
                        "  password_env: RAYDIST_TEST_PW\n  password_file: /run/secrets/x\n")
    assert "mutually exclusive" in error_of(write(tmp_path, text, "both.yaml"))


def test_password_env_must_be_a_name_not_a_value(tmp_path: Path):
    message = error_of(write(tmp_path, GOOD.replace("RAYDIST_TEST_PW", "'p@ss word!'")))
    assert "store.password_env" in message and "NAME of an environment variable" in message


def test_secret_options_are_refused(tmp_path: Path):
    message = error_of({"model": "m", "store": {"url": "redis://h/0", "options": {"password": "x"}},
                        "load": {"tp": 1}})
    assert "store.options" in message and "password_env" in message


def test_unknown_scheme_lists_the_known_ones():
    message = error_of({"model": "m", "store": {"url": "ftp://host/x"}, "load": {"tp": 1}})
    assert "store.url" in message and "known schemes:" in message
    assert all(s in message.split("known schemes:")[1] for s in ("file", "redis", "rediss", "s3"))


def test_invalid_model_name():
    message = error_of({"model": "../etc", "store": {"url": "/tmp/x"}, "load": {"tp": 1}})
    assert "model: got '../etc'" in message


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    cfg = write(tmp_path, "model: x\nstore:\n  url: [a\nload: {tp: 2}\n")
    message = error_of(cfg)
    assert str(cfg) in message and "line 4" in message and "invalid YAML" in message


def test_not_a_mapping_and_empty_and_missing_file(tmp_path: Path):
    assert "expected a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "empty" in error_of(write(tmp_path, "", "empty.yaml"))
    assert "does not exist" in error_of(tmp_path / "nope.yaml")


def test_resolve_secret_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = load_config(write(tmp_path, GOOD))
    monkeypatch.setenv("RAYDIST_TEST_PW", "s3cr3t-value")
    assert resolve_secret(config.store) == {"password": "s3cr3t-value"}


def test_missing_env_var_is_named_never_its_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = load_config(write(tmp_path, GOOD))
    monkeypatch.delenv("RAYDIST_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="RAYDIST_TEST_PW is not set"):
        resolve_secret(config.store)


def test_resolve_secret_from_a_file_relative_to_the_config(tmp_path: Path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis").write_text("file-pw\n")
    text = GOOD.replace("password_env: RAYDIST_TEST_PW",
                        "password_file: secrets/redis\n  options: {db_opt: 1}")
    config = load_config(write(tmp_path, text))
    assert config.store.password_file == str(tmp_path.resolve() / "secrets" / "redis")
    assert resolve_secret(config.store) == {"db_opt": 1, "password": "file-pw"}
    config.store.password_file = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_secret(config.store)


def test_no_secret_means_just_the_options():
    config = load_config({"model": "m", "store": {"url": "s3://b/p", "options": {"endpoint_url": "http://x"}},
                          "load": {"tp": 1}})
    assert resolve_secret(config.store) == {"endpoint_url": "http://x"}


def test_relative_rules_path_is_taken_from_the_config_directory(tmp_path: Path):
    config = load_config(write(tmp_path, GOOD + "  rules: rules/llama.yaml\n"))
    assert config.load.rules == str(tmp_path.resolve() / "rules" / "llama.yaml")


def test_a_password_pasted_into_password_env_is_never_echoed(tmp_path):
    text = ("model: m\nstore:\n  url: redis://loader@127.0.0.1:6379/0\n  password_env: 'hunter2-S3cr3t!'\n"
            "load:\n  tp: 1\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="store.password_env") as info:
        load_config(path)
    assert "hunter2" not in str(info.value)
