"""``raydist.json``: pull-files leaves the store's URL (no secret) and the model in an engine's model directory, and
the engines' options fall back to it (SGLang's ``update_weights_from_disk`` passes none). Inside the engines:
tests/test_vllm.py starts a vLLM engine with no options (test_vllm_without_options_reads_the_locator), and
tests/test_sglang.py starts SGLang engines with none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import raydist_loader as rl
from raydist_loader.cli import main
from raydist_loader.engines.handoff import EngineOptions
from raydist_loader.errors import ConfigError
from raydist_loader.redact import url_without_secrets
from raydist_loader.store.locator import LOCATOR_FILE, read_locator, write_locator
from raydist_loader.testing.tiny_models import make_tiny_checkpoint


@pytest.mark.parametrize(("url", "stored"), [
    ("redis://user:s3cret@h:6379/0", "redis://user@h:6379/0"),
    ("redis://:s3cret@h:6379/0", "redis://h:6379/0"),
    ("rediss://h:6380/0?ssl_ca_certs=/ca.pem&password=s3cret", "rediss://h:6380/0?ssl_ca_certs=%2Fca.pem"),
    ("s3://bucket/prefix?endpoint_url=http://h:9000", "s3://bucket/prefix?endpoint_url=http%3A%2F%2Fh%3A9000"),
    ("file:///srv/store", "file:///srv/store"),
    ("/srv/store", "/srv/store"),
])
def test_the_stored_url_has_no_secret(url, stored):
    assert url_without_secrets(url) == stored
    assert "s3cret" not in url_without_secrets(url)


def test_pull_files_writes_the_locator_and_engines_read_it(tmp_path: Path):
    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    written = rl.pull_files(url, "m", tmp_path / "dir")
    assert LOCATOR_FILE not in {p.name for p in written}  # the model's files only
    assert json.loads((tmp_path / "dir" / LOCATOR_FILE).read_text()) == {"url": url, "model": "m"}
    options = EngineOptions.resolve({}, "model_loader_extra_config", tmp_path / "dir")
    assert (options.url, options.model, options.password_env) == (url, "m", None)
    given = EngineOptions.resolve({"url": "redis://h:1/0", "model": "x"}, "model_loader_extra_config", tmp_path / "dir")
    assert (given.url, given.model) == ("redis://h:1/0", "x")  # options given win over the file


def test_the_cli_records_the_password_variable_name_never_its_value(tmp_path: Path, start_redis, monkeypatch):
    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    server = start_redis()
    with server.client() as client:
        client.config_set("requirepass", "s3cret")
    url = server.url
    rl.publish(ckpt, url, "m", max_tp=2, connector_options={"password": "s3cret"})
    monkeypatch.setenv("STORE_PW", "s3cret")
    assert main(["pull-files", url, "--model", "m", "--password-env", "STORE_PW", str(tmp_path / "dir")]) == 0
    text = (tmp_path / "dir" / LOCATOR_FILE).read_text()
    assert json.loads(text) == {"url": url, "model": "m", "password_env": "STORE_PW"} and "s3cret" not in text
    options = EngineOptions.resolve(None, "model_loader_extra_config", tmp_path / "dir")
    assert options.connector_options() == {"password": "s3cret"}


def test_no_options_and_no_locator_says_how_to_write_one(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model_loader_extra_config is empty and .*/raydist.json does not exist; "
                       r"give model_loader_extra_config = .*`raydist-loader pull-files URL --model NAME "):
        EngineOptions.resolve({}, "model_loader_extra_config", tmp_path)


@pytest.mark.parametrize(("body", "message"), [
    ("{not json", "is not valid JSON"),
    ("[1]", "must hold a JSON object, got list"),
])
def test_a_broken_locator_is_named(tmp_path: Path, body: str, message: str):
    (tmp_path / LOCATOR_FILE).write_text(body)
    with pytest.raises(ConfigError, match=message):
        read_locator(tmp_path)


def test_a_locator_is_checked_as_options_are(tmp_path: Path):
    write_locator(tmp_path, "redis://h:6379/0", "m")
    (tmp_path / LOCATOR_FILE).write_text(json.dumps({"url": "redis://h:6379/0", "model": "m", "revision": "x"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['revision'\] in .*raydist.json"):
        EngineOptions.resolve({}, "model_loader_extra_config", tmp_path)
