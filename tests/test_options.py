"""Load options are defined once (raydist_loader.options): every knob round-trips through a YAML config and a CLI
flag under the same name, and no entry point carries a default of its own."""

from __future__ import annotations

import inspect

import pytest

from raydist_loader import api
from raydist_loader.cli import _load_settings, _Out, build_parser, main
from raydist_loader.config import LoadSection, load_config
from raydist_loader.errors import ConfigError
from raydist_loader.load.worker import ShardLoader
from raydist_loader.options import DEFAULTS, LoadOptions, RetriesOptions, load_options
from raydist_loader.retry import RetryPolicy

# option -> (YAML value, CLI text, the option's value), each different from the default
KNOBS = {
    "device": ("cpu", "cpu", "cpu"),
    "placement": ("strict_spread", "strict_spread", "strict_spread"),
    "replicas": (2, "2", 2),
    "concurrency": (3, "3", 3),
    "verify": ("full", None, "full"),  # CLI: --verify-full
    "num_cpus_per_actor": (0.5, "0.5", 0.5),
    "timeout_s": (42, "42", 42.0),
    "placement_timeout_s": (7.5, "7.5", 7.5),
    "actor_start_timeout_s": (90, "90", 90.0),
    "max_restarts": (3, "3", 3),
    "model_version": ("v20261204183000123-1a2b3c4d", "v20261204183000123-1a2b3c4d", "v20261204183000123-1a2b3c4d"),
    "retries": ({"attempts": 2, "deadline_s": 9}, "attempts=2,deadline_s=9", RetriesOptions(attempts=2, deadline_s=9)),
}
BASE = {"model": "m", "store": {"url": "/tmp/store"}}


def _options_from_cli(*flags: str) -> LoadOptions:
    args = build_parser().parse_args(["load", "/tmp/store", "--model", "m", "--tp", "2", *flags])
    kwargs, _, _ = _load_settings(args, _Out())
    return load_options({k: kwargs[k] for k in LoadOptions.model_fields})


def _only_changed(options: LoadOptions, knob: str, value) -> None:
    assert getattr(options, knob) == value
    assert options.model_copy(update={knob: getattr(DEFAULTS, knob)}) == DEFAULTS, "other options keep defaults"


def test_every_option_has_a_round_trip_case():
    assert set(KNOBS) == set(LoadOptions.model_fields)


@pytest.mark.parametrize("knob", KNOBS)
def test_yaml_key_round_trips(knob):
    yaml_value, _, value = KNOBS[knob]
    _only_changed(load_config({**BASE, "load": {"tp": 2, knob: yaml_value}}).load.options(), knob, value)


@pytest.mark.parametrize("knob", KNOBS)
def test_cli_flag_round_trips(knob):
    _, text, value = KNOBS[knob]
    flags = ["--verify-full"] if text is None else [f"--{knob.replace('_', '-')}", text]
    _only_changed(_options_from_cli(*flags), knob, value)


def test_cli_retries_shorthand_and_flags_override_the_file(tmp_path):
    assert _options_from_cli("--retries", "7").retries == RetriesOptions(attempts=7)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nstore: {url: /tmp/store}\nload: {tp: 2, max_restarts: 3, placement_timeout_s: 5}\n")
    args = build_parser().parse_args(["load", "--config", str(cfg), "--max-restarts", "0"])
    kwargs, _, _ = _load_settings(args, _Out())
    assert (kwargs["max_restarts"], kwargs["placement_timeout_s"], kwargs["timeout_s"]) == (0, 5, DEFAULTS.timeout_s)


def test_defaults_are_defined_once():
    cluster = inspect.signature(api.load_across_cluster).parameters
    shard = inspect.signature(api.load_shard).parameters
    actor = inspect.signature(ShardLoader).parameters
    for name in LoadOptions.model_fields:
        expected = None if name == "retries" else getattr(DEFAULTS, name)  # None: the default policy
        assert cluster[name].default == expected, name
        for params in (shard, actor):
            if name in params:
                assert params[name].default == expected, name
    assert {"device", "concurrency", "verify", "retries"} <= set(shard) & set(actor)
    assert LoadSection(tp=1).options() == DEFAULTS  # the YAML section inherits the fields
    assert _options_from_cli() == DEFAULTS, "no CLI flag has a default of its own"
    assert load_options({"retries": None}) == DEFAULTS
    assert RetriesOptions().policy() == RetryPolicy()


def test_bad_values_are_one_clear_error_everywhere(tmp_path, capsys):
    with pytest.raises(ConfigError,
                       match=r"load options: max_restarts: got -1 \(int\); expected a value in \[0, 100\]"):
        load_options({"max_restarts": -1})
    # a misspelt nested key from code lists the keys that level accepts (the API's options, not the YAML file's)
    known = "known keys: attempts, base_delay_s, max_delay_s, deadline_s"
    with pytest.raises(ConfigError, match=rf"load options: retries\.tris: unknown key; {known}$"):
        load_options({"retries": {"tris": 3}})
    with pytest.raises(ConfigError,
                       match=r"load\.actor_start_timeout_s: got 0 \(int\); expected a value in \(0, 604800\]"):
        load_config({**BASE, "load": {"tp": 2, "actor_start_timeout_s": 0}})
    code = main(["load", "/tmp/store", "--model", "m", "--tp", "2", "--placement-timeout-s", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--placement-timeout-s: expected a number in (0, 604800], got 0.0" in err
    assert "Traceback" not in err
    code = main(["load", "/tmp/store", "--model", "m", "--tp", "2", "--retries", "tries=3"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown retries key 'tries'; known: attempts, base_delay_s" in err
