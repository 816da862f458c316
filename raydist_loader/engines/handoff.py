"""Layer 5 (entry points): The engine hand-off, engine-neutral: one TP rank's verified shard, as the full-size tensors
engines want.

Serving engines (vLLM, SGLang) load weights through per-layer weight loaders that take the *full* checkpoint tensor
and narrow it by the worker's TP rank themselves (vLLM's v2 parameters ignore ``is_sharded_weight``; its vocab and
MoE loaders never look at it). So each rank pulls only its shard, but lands it in the ``global`` layout
(:data:`raydist_loader.store.plan.Layout`): every tensor is a full-size host tensor whose rank region (split dim,
segments, kv replica) holds the verified bytes, read there directly with no copy in between. On CPU the pages
outside the region are never touched, so never committed. The engine's loaders then copy each region into its
parameter on the worker's device, one tensor at a time, so a GPU never holds a second copy of the weights.

:func:`rank_weights` streams those tensors (:mod:`raydist_loader.load.stream`): each group is pulled and verified
just before it is handed over and dropped after, so host memory is bounded by the staging parts plus one group,
not by the shard. :func:`load_into` goes further: where the model's weight loader is provably a plain narrow +
copy (:mod:`.direct`), the chunks are read straight into the parameters, and only the other tensors are streamed
through ``load_weights``. An update of a serving engine (:func:`update_rank`) verifies the whole shard before the
engine gets any tensor, and builds what the parameters hold from the bytes they serve and the new version's deltas.

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

from ..connectors import check_url
from ..errors import ConfigError, ShardingError
from ..load.served import Served, pull_update
from ..load.stream import ShardStream
from ..options import LoadOptions, load_options
from ..redact import redact_url, url_password
from ..report import RankReport, check_verified
from ..store.experts import Experts
from ..store.locator import LOCATOR_FILE, read_locator
from ..store.verify import check_pin
from ..store.versions import VersionRef
from .direct import Capture, capture

# validated as the load options of every other entry point
_LOAD_KEYS = ("verify", "concurrency", "retries", "model_version")
OPTIONS: dict[str, str] = {
    "url": "store URL (redis://host:port/db, rediss://..., s3://bucket/prefix, file:///dir or a path); required",
    "model": "model name inside the store; required",
    **{key: LoadOptions.model_fields[key].description or "" for key in _LOAD_KEYS},
    "model_version": "load this version (`raydist-loader versions` lists them), current or not, at the first load "
                     "and at every update; unset: the current version, resolved once for the whole engine",
    "expect_manifest_sha256": "refuse a manifest whose sha256 differs (hex)",
    "password_env": "name of the environment variable that holds the store's password",
}
"""Every option key an engine may pass, and what it means (unknown keys are refused with this list)."""


@dataclass(frozen=True)
class EngineOptions:
    """The validated options of an engine load format. Secrets are named by environment variable only."""

    url: str
    model: str
    load: LoadOptions  # verify, concurrency, retries, model_version (the rest of LoadOptions is Ray's)
    expect_manifest_sha256: str | None = None
    password_env: str | None = None

    @property
    def model_version(self) -> str | None:
        return self.load.model_version

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
        for key in ("url", "model", "expect_manifest_sha256", "password_env", "model_version"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ConfigError(f"{where}.{key} must be a string, got {type(raw[key]).__name__}")
        check_url(raw["url"])  # a bad URL, credentials in its options: one line, before anything starts
        if url_password(raw["url"]):
            raise ConfigError(
                f"{where}.url {redact_url(raw['url'])} carries an inline password, which engine logs and `ps` can "
                'show: put it in an environment variable and name that variable with "password_env"'
            )
        return cls(
            url=raw["url"],
            model=raw["model"],
            load=load_options({k: raw[k] for k in _LOAD_KEYS if k in raw}, where),
            expect_manifest_sha256=check_pin(raw.get("expect_manifest_sha256"), f"{where}.expect_manifest_sha256"),
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

    @classmethod
    def for_update(cls, raw: Mapping[str, Any] | None, where: str, start_dir: str | os.PathLike | None,
                   update_dir: str | os.PathLike | None) -> EngineOptions:
        """The options of a weight update from ``update_dir`` (vLLM's ``reload_weights(weights_path=DIR)``,
        SGLang's ``update_weights_from_disk(DIR)``): the engine's own (as at its start), except that a directory
        other than the one the engine started on that holds a ``raydist.json`` names the store, the model and the
        version for this update (``raydist-loader pull-files URL --model M --model-version V DIR``: an update
        to a named version)."""
        if update_dir and start_dir and os.path.realpath(update_dir) != os.path.realpath(start_dir):
            locator = read_locator(update_dir)
            if locator is not None:
                return cls.parse({**(raw or {}), **locator}, f"{update_dir}/{LOCATOR_FILE}")
        return cls.resolve(raw, where, start_dir)

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
        return (f"EngineOptions(url={redact_url(self.url)!r}, model={self.model!r}, verify={self.load.verify!r}, "
                f"model_version={self.model_version!r})")


def pull_rank(
    options: EngineOptions,
    tp: int,
    rank: int,
    *,
    only: Callable[[str], bool] | None = None,
    experts: Experts | None = None,
    version: VersionRef | None = None,
):
    """Pull and verify rank ``rank`` of ``tp`` in the ``global`` layout (host memory); raises before the engine
    sees any weight if a digest stays wrong after one re-pull. ``only`` keeps a pipeline stage's tensors;
    ``experts``, the engine's expert placement under expert parallelism (:mod:`raydist_loader.store.experts`).
    Returns the :class:`~raydist_loader.api.Shard`."""
    from ..api import load_shard

    return load_shard(options.model, options.url, tp, rank, **_shard_args(options, only, experts, version))


def _shard_args(options: EngineOptions, only: Callable[[str], bool] | None, experts: Experts | None,
                version: VersionRef | None) -> dict:
    """The keyword arguments of ``load_shard`` / ``open_shard`` for a hand-off: host memory, ``global`` layout;
    ``version`` (what the engine agreed on, :func:`agree_version`) else the options' pin else the current one."""
    return dict(
        model_version=version.version if version else options.model_version,
        manifest_sha256=version.manifest_sha256 if version else None,
        device="cpu",
        concurrency=options.load.concurrency,
        verify=options.load.verify,
        expect_manifest_sha256=options.expect_manifest_sha256,
        connector_options=options.connector_options(),
        retries=options.load.retries.policy(),
        only=only,
        layout="global",
        experts=experts,
    )


@dataclass
class Delivery:
    """What a hand-off delivered into an engine's model: the parameter names the model's ``load_weights``
    reported (None when it reports nothing) and the rank's load report."""

    loaded: set[str] | None
    report: RankReport
    capture: Capture | None = None  # where each tensor went: straight into parameters or through load_weights
    served: Served | None = None  # what the rank serves now, for the next update (:mod:`raydist_loader.load.served`)


def open_stream(
    options: EngineOptions,
    tp: int,
    rank: int,
    *,
    only: Callable[[str], bool] | None = None,
    experts: Experts | None = None,
    version: VersionRef | None = None,
) -> ShardStream:
    """Rank ``rank`` of ``tp`` opened for streaming in the ``global`` layout on the host: the store opened, the
    manifest checked, the plan made, no byte read yet. The caller closes it."""
    from ..api import open_shard

    loader = open_shard(options.model, options.url, tp, rank, **_shard_args(options, only, experts, version))
    try:
        stream = ShardStream(loader)
    except BaseException:
        loader.close()
        raise
    if not stream.plan.tensors:
        stream.close()
        raise _no_tensor(options, tp, rank)
    return stream


def _no_tensor(options: EngineOptions, tp: int, rank: int) -> ShardingError:
    return ShardingError(
        f"model {options.model!r} has no tensor for this worker (rank {rank}/{tp}): the store's tensor names "
        "do not match the engine's model"
    )


def rank_weights(
    options: EngineOptions,
    tp: int,
    rank: int,
    *,
    only: Callable[[str], bool] | None = None,
    experts: Experts | None = None,
    version: VersionRef | None = None,
) -> tuple[Iterator[tuple[str, torch.Tensor]], Callable[[], RankReport]]:
    """The rank's verified weights as ``(checkpoint name, full-size tensor)`` pairs for an engine's
    ``load_weights`` (or its reload path), and a function that returns the load report once they are consumed
    (it raises unless the rank digest over every chunk is the expected one).

    Each tensor is yielded as soon as its chunks have landed and verified, and dropped after; a chunk still wrong
    after its re-pull raises out of the iterator, before the engine got that tensor (but after it got earlier
    ones): a first load. An update of a serving engine verifies the whole shard first: :func:`update_rank`."""
    stream = open_stream(options, tp, rank, only=only, experts=experts, version=version)

    def streamed() -> Iterator[tuple[str, torch.Tensor]]:
        try:
            yield from stream.weights()
        finally:
            stream.close()

    return streamed(), stream.report


def load_into(
    model: torch.nn.Module,
    options: EngineOptions,
    tp: int,
    rank: int,
    *,
    only: Callable[[str], bool] | None = None,
    experts: Experts | None = None,
    direct: bool = True,
    version: VersionRef | None = None,
) -> Delivery:
    """Pull rank ``rank`` of ``tp`` verified into ``model`` (vLLM and SGLang models share ``load_weights``).

    With ``direct`` (default), the model's ``load_weights`` is first run over probe tensors to learn, per checkpoint
    tensor, which parameter region each of the rank's chunks is copied into (:mod:`.direct`); those chunks are
    then read and hashed straight into the parameters, and only the other tensors (casts, transposes, anything
    not provably a plain copy) are streamed through ``load_weights``, one group at a time. Raises before the
    engine serves if a digest stays wrong after one re-pull; parameters written before that are left as they are
    (the engine discards the model)."""
    stream = open_stream(options, tp, rank, only=only, experts=experts, version=version)
    try:
        captured = capture(model, stream.plan) if direct else None
        if captured is not None:
            stream.land(captured.targets)
        loaded = model.load_weights(stream.weights(skip=captured.direct if captured else ()))
        report = stream.report()
    finally:
        stream.close()
    if captured is not None:
        report.phases["capture_s"] = captured.seconds
        if loaded is not None and captured.loaded is not None:  # the probe run reported every tensor's parameters
            loaded = set(loaded) | captured.loaded
    served = Served.of(stream.plan, captured.targets if captured is not None else None)
    return Delivery(set(loaded) if loaded is not None else None, report, captured, served)


@dataclass
class Update:
    """An update's verified weights for the engine's ``load_weights`` (each handed over once), its report, and
    what the rank serves once the engine has taken them all."""

    weights: Iterator[tuple[str, torch.Tensor]]
    report: RankReport
    served: Served


def update_rank(
    options: EngineOptions,
    tp: int,
    rank: int,
    *,
    only: Callable[[str], bool] | None = None,
    experts: Experts | None = None,
    version: VersionRef | None = None,
    served: Served | None = None,
) -> Update:
    """Rank ``rank`` of ``tp`` of the version an update moves to, pulled and verified WHOLE before the engine gets
    any tensor (verify before write; the shard is held in host memory meanwhile), in the ``global`` layout. With
    ``served`` (what the rank serves now), chunks its parameters hold are built from those bytes and the new
    version's deltas, read alone (:func:`~raydist_loader.load.served.pull_update`); raises, naming rank, tensor
    and chunk, if a digest stays wrong."""
    from ..api import open_shard

    loader = open_shard(options.model, options.url, tp, rank, **_shard_args(options, only, experts, version))
    try:
        report = pull_update(loader, served)
        report.phases["manifest_s"] = loader.opened_s
        if loader.verify:
            check_verified(options.model, [report])
        plan, tensors = loader.plan, loader.tensors
    finally:
        loader.close()
    if not plan.tensors:
        raise _no_tensor(options, tp, rank)
    now = served.moved_to(plan) if served is not None else Served.of(plan, None)

    def held() -> Iterator[tuple[str, torch.Tensor]]:
        while tensors:  # hand each tensor over once and drop it: the engine has copied it into its parameter
            name = next(iter(tensors))
            yield name, tensors.pop(name)

    return Update(held(), report, now)


def describe_update(report: RankReport) -> str:
    """One line on what an update moved: chunks built from the served weights, bytes read from the store."""
    reused = int(report.phases.get("reused_chunks", 0))
    return (f"{reused} of {report.chunks} chunks built from the weights served, {report.bytes_read / 1e6:.2f} MB "
            f"read from the store for a {report.bytes / 1e6:.1f} MB shard")


def missing_names(expected: set[str], delivered: set[str], what: str, limit: int = 20) -> str | None:
    """A message listing the parameters an engine expected but did not get (None when nothing is missing)."""
    missing = sorted(expected - delivered)
    if not missing:
        return None
    shown = ", ".join(missing[:limit]) + (f" and {len(missing) - limit} more" if len(missing) > limit else "")
    return f"{len(missing)} parameter(s) of {what} were not loaded from the store: {shown}"
