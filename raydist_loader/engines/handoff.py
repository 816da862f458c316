"""Layer 5 (entry points): The engine hand-off, engine-neutral: one TP rank's verified shard, as the full-size tensors
engines want.

Serving engines (vLLM, SGLang) load weights through per-layer weight loaders that take the *full* checkpoint tensor
and narrow it by the worker's TP rank themselves (vLLM's v2 parameters ignore ``is_sharded_weight``; its vocab and
MoE loaders never look at it). So each rank pulls only its shard, but lands it in the ``global`` layout
(:data:`raydist_loader.store.plan.Layout`): every tensor is a full-size host tensor whose rank region (split dim,
segments, kv replica) holds the verified bytes, read there directly with no copy in between. On CPU the pages
outside the region are never touched, so never committed: a rank's memory is its shard. The engine's loaders then
copy each region into its parameter on the worker's device, one tensor at a time, so a GPU never holds a second
copy of the weights.

The options an engine passes (vLLM's and SGLang's ``model_loader_extra_config``) are parsed here too, so every
engine accepts the same keys with the same errors; with no options, the model directory's ``raydist.json`` (written
by ``pull-files``, :mod:`raydist_loader.store.locator`) names the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, ShardingError
from ..options import LoadOptions, load_options
from ..redact import redact_url, url_password
from ..report import RankReport
from ..store.locator import LOCATOR_FILE, read_locator

_LOAD_KEYS = ("verify", "concurrency", "retries")  # validated as the load options of every other entry point
OPTIONS: dict[str, str] = {
    "url": "store URL (redis://host:port/db, rediss://..., s3://bucket/prefix, file:///dir or a path); required",
    "model": "model name inside the store; required",
    **{key: LoadOptions.model_fields[key].description or "" for key in _LOAD_KEYS},
    "expect_manifest_sha256": "refuse a manifest whose sha256 differs (hex)",
    "password_env": "name of the environment variable that holds the store's password",
}
"""Every option key an engine may pass, and what it means (unknown keys are refused with this list)."""


@dataclass(frozen=True)
class EngineOptions:
    """The validated options of an engine load format. Secrets are named by environment variable only."""

    url: str
    model: str
    load: LoadOptions  # verify, concurrency, retries (the rest of LoadOptions is Ray's and unused here)
    expect_manifest_sha256: str | None = None
    password_env: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, where: str) -> EngineOptions:
        """Validate ``raw`` (``where`` names it in errors, e.g. ``model_loader_extra_config``)."""
        example = f'{where} = {{"url": "redis://host:6379/0", "model": "NAME"}}'
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping such as {example}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(OPTIONS)}")
        missing = [k for k in ("url", "model") if not raw.get(k)]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}: give at least {example}")
        for key in ("url", "model", "expect_manifest_sha256", "password_env"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ConfigError(f"{where}.{key} must be a string, got {type(raw[key]).__name__}")
        if url_password(raw["url"]):
            raise ConfigError(
                f"{where}.url {redact_url(raw['url'])} carries an inline password, which engine logs and `ps` can "
                'show: put it in an environment variable and name that variable with "password_env"'
            )
        return cls(
            url=raw["url"],
            model=raw["model"],
            load=load_options({k: raw[k] for k in _LOAD_KEYS if k in raw}, where),
            expect_manifest_sha256=raw.get("expect_manifest_sha256"),
            password_env=raw.get("password_env"),
        )

    @classmethod
    def resolve(cls, raw: Mapping[str, Any] | None, where: str, model_dir: str | os.PathLike | None) -> EngineOptions:
        """``raw`` when an engine was given options; else the locator ``raydist.json`` in ``model_dir`` (the
        engine's model path), as ``pull-files`` wrote it."""
        if raw:
            return cls.parse(raw, where)
        locator = read_locator(model_dir) if model_dir else None
        if locator is None:
            raise ConfigError(
                f"load format raydist needs the store: {where} is empty and {model_dir}/{LOCATOR_FILE} does not "
                f'exist; give {where} = {{"url": "redis://host:6379/0", "model": "NAME"}}, or write the model '
                f"directory with `raydist-loader pull-files URL --model NAME {model_dir}`"
            )
        return cls.parse(locator, f"{model_dir}/{LOCATOR_FILE}")

    def connector_options(self) -> dict[str, Any]:
        """The connector's options: the password read from ``password_env`` in this (worker) process."""
        if not self.password_env:
            return {}
        value = os.environ.get(self.password_env)
        if not value:
            state = "is not set" if value is None else "is set but empty"
            raise ConfigError(
                f"password_env: environment variable {self.password_env} {state} in this process "
                "(engines pass their environment to their workers: set it where the engine is started)"
            )
        return {"password": value}

    def __repr__(self) -> str:
        return f"EngineOptions(url={redact_url(self.url)!r}, model={self.model!r}, verify={self.load.verify!r})"


def pull_rank(options: EngineOptions, tp: int, rank: int, *, only: Callable[[str], bool] | None = None):
    """Pull and verify rank ``rank`` of ``tp`` in the ``global`` layout (host memory); raises before the engine
    sees any weight if a digest stays wrong after one re-pull. ``only`` keeps a pipeline stage's tensors.
    Returns the :class:`~raydist_loader.api.Shard`."""
    from ..api import load_shard

    return load_shard(
        options.model,
        options.url,
        tp,
        rank,
        device="cpu",
        concurrency=options.load.concurrency,
        verify=options.load.verify,
        expect_manifest_sha256=options.expect_manifest_sha256,
        connector_options=options.connector_options(),
        retries=options.load.retries.policy(),
        only=only,
        layout="global",
    )


@dataclass
class Delivery:
    """What a hand-off delivered into an engine's model: the parameter names the model's ``load_weights``
    reported (None when it reports nothing) and the rank's load report."""

    loaded: set[str] | None
    report: RankReport


def rank_weights(
    options: EngineOptions, tp: int, rank: int, *, only: Callable[[str], bool] | None = None
) -> tuple[Iterator[tuple[str, torch.Tensor]], Callable[[], RankReport]]:
    """The rank's verified weights as ``(checkpoint name, full-size tensor)`` pairs for an engine's
    ``load_weights`` (or its reload path), and a function that returns the load report once they are consumed.
    The one way every engine takes weights from the store: how they are pulled (whole shard first, or streamed)
    is decided here, for all engines at once."""
    return verified_rank_weights(options, tp, rank, only=only)


def verified_rank_weights(
    options: EngineOptions, tp: int, rank: int, *, only: Callable[[str], bool] | None = None
) -> tuple[Iterator[tuple[str, torch.Tensor]], Callable[[], RankReport]]:
    """As :func:`rank_weights`, but the whole shard is pulled and verified when this returns, before the engine
    sees the first tensor: for a weight update into a serving model, which a bad byte must leave untouched."""
    shard = pull_rank(options, tp, rank, only=only)
    if not shard.tensors:
        raise ShardingError(
            f"model {options.model!r} has no tensor for this worker (rank {rank}/{tp}): the store's tensor names "
            "do not match the engine's model"
        )
    report = shard.report
    tensors = shard.tensors
    del shard

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        while tensors:  # hand each tensor over once and drop it: the engine has copied it into its parameter
            name = next(iter(tensors))
            yield name, tensors.pop(name)

    return weights(), lambda: report


def load_into(
    model: torch.nn.Module,
    options: EngineOptions,
    tp: int,
    rank: int,
    *,
    only: Callable[[str], bool] | None = None,
) -> Delivery:
    """Pull rank ``rank`` of ``tp`` verified and feed it to ``model.load_weights`` (vLLM and SGLang models share
    that method). Raises before the engine serves if a digest stays wrong after one re-pull."""
    weights, report = rank_weights(options, tp, rank, only=only)
    loaded = model.load_weights(weights)
    return Delivery(set(loaded) if loaded is not None else None, report())


def missing_names(expected: set[str], delivered: set[str], what: str, limit: int = 20) -> str | None:
    """A message listing the parameters an engine expected but did not get (None when nothing is missing)."""
    missing = sorted(expected - delivered)
    if not missing:
        return None
    shown = ", ".join(missing[:limit]) + (f" and {len(missing) - limit} more" if len(missing) > limit else "")
    return f"{len(missing)} parameter(s) of {what} were not loaded from the store: {shown}"
