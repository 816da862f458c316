"""Layer 5 (entry points): SGLang load format ``raydist``: every TP worker pulls and verifies only its own shard before
SGLang sees a weight.

Registered through SGLang's general plugin entry point (group ``sglang.srt.plugins``, see :func:`register`), so it
needs no fork and no patch of SGLang's files:

    python -m sglang.launch_server --model-path DIR --load-format raydist --tp 2 \\
        --model-loader-extra-config '{"url": "redis://host:6379/0", "model": "NAME"}'

``DIR`` holds the model's config and tokenizer files and ``raydist.json`` (``raydist-loader pull-files URL --model
NAME DIR``); without ``--model-loader-extra-config`` the store is the one ``raydist.json`` names. Options are the
keys of :data:`raydist_loader.engines.handoff.OPTIONS`, parsed exactly as for vLLM. In each worker: tp and rank are
SGLang's (``runtime_context.get_parallel()``); the shard lands in host memory as full-size tensors (see
:mod:`.handoff`), SGLang's own weight loaders narrow and copy each one into its parameter, then SGLang's
quantization post-processing runs as in its default loader. Every parameter must have been written, else the load
fails with their names. ``Engine.update_weights_from_disk(DIR, load_format="raydist")`` (RL weight updates) pulls
the store's current version (or the one ``DIR/raydist.json`` pins), verified in full before the first weight is
written: a bad byte leaves the previous weights serving and the update returns the error. One version per engine
(:mod:`.agreement`): rank 0 of SGLang's world group resolves and leases the version, every rank loads that version,
and the load or update completes only when every rank reports it, verified; the version is SGLang's
``weight_version`` from the first load on. SGLang's ``--dp`` replicas are separate engines: pin them to one version
(``model_version``). Parallel settings the store's cut does not model (pipeline,
expert, attention data/context parallelism, ...) are refused, by name, before a byte is pulled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.loader import (
    BaseModelLoader,
    DefaultModelLoader,
    _get_quantization_config,
    _initialize_model,
)
from sglang.srt.model_loader.utils import set_default_torch_dtype

from ..errors import ConfigError, ShardingError
from ..load.served import Served
from ..report import RankReport
from .agreement import RankGroup, TorchGroup, agree_version, on_every_rank
from .handoff import EngineOptions, Update, describe_update, load_into, missing_names, rank_weights, update_rank

LOAD_FORMAT = "raydist"
OPTIONS_NAME = "model_loader_extra_config"
VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"
logger = logging.getLogger("sglang.raydist_loader")  # under "sglang", so SGLang's log configuration shows it
_registered = False
HOLDER = "sglang engine tp={tp}"

# SGLang's parallel settings that change which part of a tensor a worker holds, beyond tensor parallelism:
# (how it is set, the name in SGLang's parallel context, the only value this loader serves).
UNMODELLED: tuple[tuple[str, str, Any], ...] = (
    ("--pp-size (pipeline parallelism)", "pp_size", 1),
    ("--ep-size (expert parallelism)", "moe_ep_size", 1),
    ("--moe-data-parallel-size", "moe_dp_size", 1),
    ("--attention-data-parallel-size / --enable-dp-attention (data-parallel attention)", "attn_dp_size", 1),
    ("--attention-context-parallel-size", "attn_cp_size", 1),
    ("--decode-context-parallel-size", "dcp_size", 1),
    ("--dwdp-size", "dwdp_size", 1),
    ("--moe-dense-tp-size", "moe_dense_tp_size", None),
    ("--enable-dp-lm-head", "enable_dp_lm_head", False),
    ("--shared-experts-tp-size", "shared_experts_tp_size", None),
)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: add load format ``raydist`` to SGLang's choices and hook
    ``LoadConfig._verify_load_format`` so the string becomes :class:`RaydistModelLoader`. SGLang calls plugins in
    the launcher, every scheduler (TP worker) and the detokenizer: it is cheap (no store is touched) and done
    once per process."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import LOAD_FORMAT_CHOICES, add_load_format_choices
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if LOAD_FORMAT not in LOAD_FORMAT_CHOICES:  # add_load_format_choices appends, duplicates included
        add_load_format_choices([LOAD_FORMAT])
    HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)
    _registered = True


def _verify_load_format(original, self: LoadConfig, *args, **kwargs):
    """AROUND ``LoadConfig._verify_load_format``: ``"raydist"`` becomes the loader class (SGLang's
    ``get_model_loader`` instantiates a class given as load format); everything else is SGLang's."""
    if isinstance(self.load_format, str) and self.load_format.lower() == LOAD_FORMAT:
        self.load_format = RaydistModelLoader
    return original(self, *args, **kwargs)


class RaydistModelLoader(DefaultModelLoader):
    """Loads weights from a raydist_loader store: this worker's TP shard only, verified before it is used.

    A :class:`DefaultModelLoader` so that SGLang's ``update_weights_from_disk`` accepts it (it reads weights
    through :meth:`_get_weights_iterator`); nothing of the default loader's file handling is used."""

    def __init__(self, load_config: LoadConfig):
        BaseModelLoader.__init__(self, load_config)  # DefaultModelLoader's own refuses every option but its two
        self.raw_options = load_config.model_loader_extra_config or {}
        if self.raw_options:  # bad options fail here, before the model is built
            EngineOptions.parse(self.raw_options, OPTIONS_NAME)

    def options(self, model_path: str | None) -> EngineOptions:
        """The options given, else those of ``raydist.json`` in the model directory."""
        return EngineOptions.resolve(self.raw_options, OPTIONS_NAME, model_path)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded ahead: the weights stream into the workers."""

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> torch.nn.Module:
        """Build SGLang's model as its default loader does, load this worker's verified shard into it, check every
        parameter was written, then run SGLang's quantization post-processing."""
        clock = _Phases()
        tp, rank = tensor_parallel()
        refuse_padded_heads(model_config.hf_config, tp)
        options = self.options(model_config.model_path)
        if getattr(model_config, "modelopt_quant", None):
            raise ConfigError("load format raydist does not run ModelOpt quantization (--modelopt-quant): "
                              "publish the quantized checkpoint instead")
        target_device = torch.device(device_config.device)
        quant_config = _get_quantization_config(model_config, self.load_config)
        checked = model_config.quantization is None  # quantized models may legitimately lack some (scales)
        with set_default_torch_dtype(model_config.dtype):
            with target_device:
                model = _initialize_model(model_config, self.load_config, quant_config)
            clock.lap("init")
            if checked:
                _mark_unwritten(model)
                clock.lap("mark")
            group = _world()
            options, agreed = agree_version(group, HOLDER.format(tp=tp), lambda: options)

            def load() -> tuple[tuple[RankReport, Served | None], RankReport]:
                served = None
                if quant_config is None:  # plain copies read straight into the parameters, the rest streamed
                    delivery = load_into(model, options, tp, rank, version=agreed.ref)
                    report, served = delivery.report, delivery.served
                else:  # SGLang's own path for quantized weights (renames, online quantization), streamed
                    weights, reported = rank_weights(options, tp, rank, version=agreed.ref)
                    self.load_weights_only(model, weights, target_device)
                    report = reported()
                clock.lap("pull into model")
                if checked:
                    what = f"{options.model!r} (rank {rank}/{tp})"
                    message = missing_names(_all_parameters(model), _written(model), what)
                    if message:
                        raise ShardingError(f"{message}; the store's model does not match the config SGLang was "
                                            "started with")
                    clock.lap("check")
                return (report, served), report

            report, served = on_every_rank(options, group, agreed, "load", load)
            _serving[:] = [(options, agreed.ref, served)]
            _serve_as(agreed.ref.version)
            self.postprocess_weights(model, target_device)
            clock.lap("post")
        self.counter_after_loading_weights = time.perf_counter()
        model.raydist_report = report
        logger.info(_describe(model.raydist_report, clock))
        return model.eval()

    def _get_weights_iterator(self, source: DefaultModelLoader.Source, **_: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """What SGLang's ``update_weights_from_disk(DIR, load_format="raydist")`` reads: the version the engine
        agrees on (the one ``DIR/raydist.json`` pins with ``model_version``, else the current one: SGLang hands an
        update no options, only DIR) of this worker's shard, pulled and verified in full HERE on every rank, before
        SGLang writes the first weight: if any rank fails, or would not get the same version, every rank raises
        (SGLang reports it as a failed update and leaves the model untouched)."""
        tp, rank = tensor_parallel()
        if _open_update:  # SGLang rolls back a failed update on the ranks that failed (no collective: alone)
            options, ref, before = _open_update.pop()  # what the half-written parameters still hold is re-verified
            logger.info(f"raydist: rank {rank}/{tp}: rolling back to {options.model} version {ref.version}")
            return _applied(update_rank(options, tp, rank, version=ref, served=before), options, ref)

        def resolve() -> EngineOptions:  # SGLang passes no options to an update: DIR's raydist.json
            if source.model_config is not None:
                refuse_padded_heads(source.model_config.hf_config, tp)
            return self.options(source.model_or_path)

        group = _world()
        options, agreed = agree_version(group, HOLDER.format(tp=tp), resolve)

        served = _serving[0][2] if _serving else None

        def pull():
            update = update_rank(options, tp, rank, version=agreed.ref, served=served)
            return update, update.report

        update = on_every_rank(options, group, agreed, "update", pull)
        logger.info(f"{_describe(update.report, None)}; {describe_update(update.report)}")
        if _serving:
            _open_update[:] = [_serving[0]]  # what to roll back to, until this update's weights are all applied
        return _applied(update, options, agreed.ref)


#: (options, VersionRef, Served) this engine serves (Served: what the next update builds on; None: nothing)
_serving: list[tuple[EngineOptions, Any, Served | None]] = []
_open_update: list[tuple[EngineOptions, Any, Served | None]] = []  # while an update is applied: what to roll back to


def _applied(update: Update, options: EngineOptions, ref: Any) -> Iterator:
    """The update's weights; once SGLang has taken them all, ``ref`` is what this engine serves (a failure before
    that leaves ``_open_update`` set, and SGLang's rollback reloads the version served before; the parameters
    half written then serve nothing a later update could build on)."""
    _serving[:] = [(s[0], s[1], None) for s in _serving]
    yield from update.weights
    _open_update.clear()
    _serving[:] = [(options, ref, update.served)]


def _world() -> RankGroup:
    """SGLang's world group (its CPU group): every rank of this engine."""
    from sglang.srt.runtime_context import get_parallel

    return TorchGroup.of(get_parallel().world_group)


def _serve_as(version: str) -> None:
    """Report the store version as SGLang's ``weight_version`` (in every response's ``meta_info``) from the first
    load on, through SGLang's runtime context (no patch); an update's caller sets it with
    ``update_weights_from_disk(..., weight_version=...)``. Skipped where this SGLang has no such setting."""
    try:
        from sglang.srt.runtime_context import get_context

        get_context().override("scheduler.weight_version", weight_version=version)
    except Exception:  # noqa: BLE001 - an SGLang without weight versions: nothing to report
        logger.debug("raydist: SGLang has no scheduler.weight_version to set", exc_info=True)


def tensor_parallel() -> tuple[int, int]:
    """This worker's (tp_size, tp_rank) from SGLang's parallel context, after refusing every parallel setting the
    store's per-rank cut does not model (see :data:`UNMODELLED`)."""
    from sglang.srt.runtime_context import get_model, get_parallel

    parallel = get_parallel()
    tp, rank = int(parallel.tp_size), int(parallel.tp_rank)
    refused = []
    for flag, name, served in UNMODELLED:
        value = _read(parallel, name, served)
        if value != served and not (name == "moe_dense_tp_size" and value == tp):
            refused.append(f"{flag} = {value}")
    if _read(parallel, "attn_tp_size", tp) != tp:
        refused.append(f"attention tensor-parallel size {parallel.attn_tp_size} != tp_size {tp}")
    if _read(get_model(), "is_startup_weight_load_overlap", False):
        refused.append("--startup-weight-load-mode overlap")
    if refused:
        raise ConfigError(
            f"load format raydist serves tensor parallelism alone (tp_size={tp}, each worker pulls its tp shard); "
            f"it does not model SGLang's {'; '.join(refused)}: start SGLang without these settings, or use another "
            "load format"
        )
    return tp, rank


def refuse_padded_heads(hf_config: Any, tp: int) -> None:
    """SGLang's CPU path pads the attention heads when tp does not divide them (e.g. one kv head at tp=2 becomes
    two, and the q heads double): its workers then read other rows of q/k/v/o than the store's cut gives them.
    Refuse that, naming the heads, rather than serve a wrong model. A config without ``num_key_value_heads`` (GPT-2:
    multi-head attention) has as many kv heads as attention heads."""
    heads = getattr(hf_config, "num_attention_heads", None)
    padded = [(what, getattr(hf_config, original, None), getattr(hf_config, name, None) or fallback)
              for what, original, name, fallback in (
                  ("attention heads", "original_num_attention_heads", "num_attention_heads", None),
                  ("kv heads", "original_total_num_kv_heads", "num_key_value_heads", heads))]
    changed = [f"{what} {was} -> {now}" for what, was, now in padded if was is not None and was != now]
    if changed:
        raise ConfigError(
            f"SGLang padded the model's {', '.join(changed)} for tp_size={tp} (its CPU path does this when tp does not "
            "divide the heads), so its workers cut q/k/v/o differently from the store: load format raydist does not "
            "serve that; use a tp that divides the kv heads"
        )


def _read(context: Any, name: str, default: Any) -> Any:
    """``context.name``, or ``default`` when this SGLang has no such setting."""
    try:
        return getattr(context, name)
    except (AttributeError, KeyError, ValueError, RuntimeError):
        return default


def _edges(data: torch.Tensor) -> list[torch.Tensor]:
    """The first and the last element along the last dim, for every index of the other dims (a 1-D tensor: all
    of it). A weight loader writes whole blocks of a parameter cut along one dim (rows of a fused q/k/v or
    gate/up, an expert, a vocab range) and full along the last dim (or along every other dim when it cuts the
    last): a block it skipped contains one of these elements."""
    if data.dim() <= 1:
        return [data]
    return [data[..., 0], data[..., -1]]


def _mark_unwritten(model: torch.nn.Module) -> None:
    """Set the :func:`_edges` of every floating-point parameter to NaN, so a block no weight loader wrote keeps
    some (a few elements per row: nothing like a pass over the weights)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                for edge in _edges(param.data):
                    edge.fill_(float("nan"))


def _all_parameters(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.is_floating_point()}


def _written(model: torch.nn.Module) -> set[str]:
    """The floating-point parameters with no block left unwritten (a partly written one, e.g. a fused q/k/v
    missing k, is not)."""
    with torch.no_grad():
        return {name for name, param in model.named_parameters()
                if param.is_floating_point() and not any(bool(torch.isnan(e).any()) for e in _edges(param.data))}


class _Phases:
    """Seconds per phase of a load, for the log line."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


def _describe(report: RankReport, clock: _Phases | None) -> str:
    """One log line per rank."""
    verified = "verified" if report.verify else "NOT verified (verify=false)"
    if clock is None:
        timing = "; pulled and verified for a weight update"
    else:
        phases = ", ".join(f"{name} {s:.2f}" for name, s in clock.seconds.items())
        timing = (f"; pulled, verified and loaded into the model in {clock.total:.2f} s "
                  f"({report.bytes / max(clock.total, 1e-9) / 1e9:.2f} GB/s; s per phase: {phases})")
    return (f"raydist: rank {report.rank}/{report.tp}: {report.model} version {report.version} from {report.store}: "
            f"{report.chunks} chunks, {report.bytes / 1e6:.1f} MB{timing}, {verified}")
