"""The engine hand-off without an engine: the ``global`` layout, the tensor filter, and the engine options.

An engine's weight loader narrows a full tensor by its TP rank. In the ``global`` layout every tensor is full-size
and the rank's region (its segments on the split dim) must hold exactly the checkpoint's bytes there, for every
cut the presets make; the reads, the digests and the report stay those of the rank layout.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from raydist_loader.api import load_shard
from raydist_loader.engines.handoff import OPTIONS, EngineOptions, missing_names, pull_rank
from raydist_loader.errors import ConfigError, ShardingError

from .shards import publish_cases

MAX_TP = 4
# fused qkv/gate_up (phi3), MQA with tied embeddings (gemma), Conv1D [in, out] (gpt2), MoE experts (mixtral),
# q/k/v biases (qwen2), GQA (llama); the in-place layout reads strided spans and cuts them.
CASES = [("llama", "chunked"), ("phi3", "chunked"), ("gemma", "chunked"), ("gpt2", "chunked"),
         ("mixtral", "chunked"), ("qwen2", "in-place"), ("llama", "in-place")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[str, dict]]:
    """(model_type, layout) -> (store url, the checkpoint's tensors)."""
    cases = publish_cases(tmp_path_factory.mktemp("handoff"), CASES, MAX_TP)
    return {case: (url, load_file(ckpt / "model.safetensors")) for case, (url, ckpt) in cases.items()}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(("model_type", "layout"), CASES)
def test_global_layout_puts_each_rank_shard_in_its_region(stores, model_type, layout, tp):
    url, full = stores[(model_type, layout)]
    for rank in range(tp):
        ranked = load_shard(model_type, url, tp, rank, device="cpu")
        glob = load_shard(model_type, url, tp, rank, device="cpu", layout="global")
        assert glob.report.digest == ranked.report.digest == glob.report.expected_digest
        assert glob.report.bytes == ranked.report.bytes  # same reads: only where they land differs
        assert set(glob.tensors) == set(full)
        for name, tensor in glob.tensors.items():
            meta = glob.metadata[name]
            assert tuple(tensor.shape) == tuple(full[name].shape) == tuple(meta["global_shape"])
            if meta["dim"] is None:
                assert torch.equal(tensor, full[name]), name
                continue
            regions = [tensor.narrow(meta["dim"], a, b - a) for a, b in meta["segments"].values()]
            for region, (a, b) in zip(regions, meta["segments"].values(), strict=True):
                assert torch.equal(region, full[name].narrow(meta["dim"], a, b - a)), (name, rank, a, b)
            # the rank layout's shard is exactly these regions, concatenated in segment order
            assert torch.equal(torch.cat(regions, meta["dim"]), ranked.tensors[name]), (name, rank)


def test_only_keeps_a_subset_and_verifies_it(stores):
    url, full = stores[("llama", "chunked")]
    first = {n for n in full if n.startswith("model.layers.0.") or n == "model.embed_tokens.weight"}
    shard = load_shard("llama", url, 2, 1, device="cpu", only=first.__contains__, layout="global")
    whole = load_shard("llama", url, 2, 1, device="cpu")
    assert set(shard.tensors) == first
    assert shard.report.digest == shard.report.expected_digest != whole.report.digest
    assert 0 < shard.report.bytes < whole.report.bytes


def test_an_unserved_tp_is_refused_listing_the_served_ones(stores):
    url, _ = stores[("llama", "chunked")]
    with pytest.raises(ShardingError) as e:
        pull_rank(EngineOptions.parse({"url": url, "model": "llama"}, "extra"), 3, 0)
    assert "tp=3" in str(e.value) and "1, 2, 4" in str(e.value)


def test_pull_rank_reads_the_password_from_the_named_variable(stores, monkeypatch):
    url, full = stores[("gpt2", "chunked")]
    options = EngineOptions.parse({"url": url, "model": "gpt2", "verify": "full", "concurrency": 2,
                                   "retries": {"attempts": 2}}, "extra")
    assert options.load.retries.attempts == 2 and options.load.concurrency == 2
    shard = pull_rank(options, 2, 0)
    assert set(shard.tensors) == set(full) and shard.report.verify == "full"
    monkeypatch.setenv("RAYDIST_TEST_PW", "s3cret")
    assert EngineOptions.parse({"url": url, "model": "m", "password_env": "RAYDIST_TEST_PW"}, "x")\
        .connector_options() == {"password": "s3cret"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"url": "redis://h:1/0", "model": "m", "revision": "x"},
         "unknown key(s) ['revision'] in extra; known keys: url, model, verify, concurrency, retries, "),
        ({"url": "redis://h:1/0"}, "extra lacks model: give at least extra = {\"url\""),
        ("redis://h:1/0", "extra must be a mapping such as"),
        # verify, concurrency and retries are validated as the load options of every other entry point
        ({"url": "redis://h:1/0", "model": "m", "verify": "yes"}, "extra: verify: got 'yes'; expected true, false"),
        ({"url": "redis://h:1/0", "model": "m", "concurrency": 0}, "extra: concurrency: got 0 (int); expected a va"),
        ({"url": "redis://h:1/0", "model": "m", "retries": 3}, "extra: retries: got 3 (int); expected a valid dic"),
        ({"url": "redis://h:1/0", "model": "m", "retries": {"tries": 3}}, "extra: retries.tries: unknown key"),
        ({"url": "redis://h:1/0", "model": 7}, "extra.model must be a string, got int"),
    ],
)
def test_bad_options_get_one_clear_error(raw, message):
    with pytest.raises(ConfigError) as e:
        EngineOptions.parse(raw, "extra")
    assert message in str(e.value)


def test_unknown_key_error_lists_every_known_key():
    with pytest.raises(ConfigError) as e:
        EngineOptions.parse({"url": "u", "model": "m", "typo": 1}, "extra")
    assert str(e.value).endswith("known keys: " + ", ".join(OPTIONS)) and len(OPTIONS) == 8


def test_model_version_is_an_engine_option_checked_as_everywhere_else():
    pin = "v20261204183000123-1a2b3c4d"
    assert EngineOptions.parse({"url": "u", "model": "m", "model_version": pin}, "extra").model_version == pin
    assert EngineOptions.parse({"url": "u", "model": "m"}, "extra").model_version is None
    with pytest.raises(ConfigError, match=r"extra: model_version: got 'latest'"):
        EngineOptions.parse({"url": "u", "model": "m", "model_version": "latest"}, "extra")


def test_secrets_only_by_variable_name(monkeypatch):
    with pytest.raises(ConfigError) as e:
        EngineOptions.parse({"url": "redis://user:hunter2@h:6379/0", "model": "m"}, "extra")
    assert "hunter2" not in str(e.value) and "password_env" in str(e.value) and "user:***@h" in str(e.value)
    monkeypatch.delenv("RAYDIST_NOT_SET", raising=False)
    options = EngineOptions.parse({"url": "redis://h:6379/0", "model": "m", "password_env": "RAYDIST_NOT_SET"}, "x")
    with pytest.raises(ConfigError, match="environment variable RAYDIST_NOT_SET is not set"):
        options.connector_options()
    monkeypatch.setenv("RAYDIST_NOT_SET", "pw")
    assert "pw" not in repr(options)


def test_missing_names_lists_what_did_not_arrive():
    assert missing_names({"a", "b"}, {"a", "b", "c"}, "m") is None
    message = missing_names({f"p{i:02d}" for i in range(25)}, {"p00"}, "model 'x'", limit=3)
    assert message == "24 parameter(s) of model 'x' were not loaded from the store: p01, p02, p03 and 21 more"


def test_engine_modules_do_not_import_their_engine_on_package_import():
    import importlib
    import sys

    importlib.import_module("raydist_loader.engines")
    importlib.import_module("raydist_loader.engines.handoff")
    assert "vllm" not in sys.modules
