"""Layer 5 (entry points): vLLM load format ``raydist``: every TP worker pulls and verifies only its own shard before
vLLM sees a weight.

Registered through the ``vllm.general_plugins`` entry point (see :func:`register`), so it needs no fork and no patch:

    vllm serve DIR --load-format raydist \\
        --model-loader-extra-config '{"url": "redis://host:6379/0", "model": "NAME"}' --tensor-parallel-size 2

``DIR`` holds the model's config and tokenizer files (``raydist-loader pull-files URL --model NAME DIR``) and
``raydist.json``, which names the store when no options are given. Options are the keys of
:data:`raydist_loader.engines.handoff.OPTIONS`. In each worker: tp and rank are vLLM's TP world size and rank; with
pipeline parallelism a stage pulls only the tensors of the modules it owns. With expert parallelism
(``enable_expert_parallel``) each worker reads its MoE layers' own placement (``expert_map``) and pulls the routed
experts it holds whole, and no other expert (:mod:`raydist_loader.store.experts`). Any parallel setting the
hand-off does not model (see :func:`check_parallel`) is refused before a byte is loaded. Tensors whose vLLM
weight loader is a plain narrow + copy are read straight into their parameters; the others are streamed as
full-size host tensors through vLLM's own weight loaders, one group at a time (see :mod:`.handoff`). Afterwards
every parameter of the model must have been loaded, else the load fails with their names. The rank's load report is
left on the model as ``model.raydist_report``. vLLM's in-place ``reload_weights`` (RL weight updates) pulls the
store's current version (or the options' ``model_version``; ``reload_weights(weights_path=DIR)`` with a DIR whose
``raydist.json`` names a version: that version), verified on every rank before vLLM gets any of it.

One version per engine (:mod:`.agreement`): world rank 0 (vLLM's world group spans TP, PP and the data-parallel
ranks of one server) resolves the version and leases it; every worker loads that version's own manifest; the load or
reload completes only when every worker reports that version, verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.config import ModelConfig, ParallelConfig, get_current_vllm_config_or_none
from vllm.config.load import LoadConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_world_group,
)
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.models.utils import is_pp_missing_parameter

from ..api import open_manifest
from ..errors import ConfigError, ShardingError
from ..report import RankReport
from ..store.experts import Experts, owned_by_layer
from .agreement import TorchGroup, agree_version, on_every_rank
from .direct import Capture
from .handoff import EngineOptions, describe_update, load_into, missing_names, update_rank

LOAD_FORMAT = "raydist"
OPTIONS_NAME = "model_loader_extra_config"
logger = init_logger("vllm.raydist_loader")  # under "vllm", so vLLM's log configuration shows it
_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register load format ``raydist``. vLLM calls plugins in every
    process, possibly more than once; registering again would only log an "overwritten" warning, so it is done
    once per process."""
    global _registered
    if not _registered:
        register_model_loader(LOAD_FORMAT)(RaydistModelLoader)
        _registered = True


class RaydistModelLoader(BaseModelLoader):
    """Loads weights from a raydist_loader store: this worker's TP shard only, verified before it is used."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.raw_options = load_config.model_loader_extra_config or {}
        if self.raw_options:  # bad options fail here; without any, the model directory's raydist.json is read
            EngineOptions.parse(self.raw_options, OPTIONS_NAME)

    def options(self, model_config: ModelConfig) -> EngineOptions:
        """The options given, else those of ``raydist.json`` in the model directory (``pull-files`` writes it)."""
        return EngineOptions.resolve(self.raw_options, OPTIONS_NAME, model_config.model)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded ahead (the weights stream into the workers); check that the store answers and
        holds a valid manifest for the model, so a wrong URL or name fails early."""
        options = self.options(model_config)
        open_manifest(
            options.url,
            options.model,
            model_version=options.model_version,
            expect_manifest_sha256=options.expect_manifest_sha256,
            connector_options=options.connector_options(),
        )

    def load_model(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        """vLLM's model load, then the served places narrowed to the parameters vLLM kept after its weight
        post-processing (a parameter it replaced holds no checkpoint bytes an update could build on)."""
        model = super().load_model(*args, **kwargs)
        served = getattr(model, "raydist_served", None)
        if served is not None:
            model.raydist_served = served.kept_in(_live_tensors(model))
        return model

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        t0 = time.perf_counter()
        tp, rank, pp = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank(), get_pp_group()
        group = TorchGroup.of(get_world_group())
        placed: list = []

        def resolve() -> EngineOptions:  # what can fail on one rank only fails on every rank (agree_version)
            options = self.options(model_config)
            placed.append(_placement(model, tp, rank))
            return options

        options, agreed = agree_version(group, _holder(tp, pp), resolve)
        experts = placed[0]

        def load():
            delivery = load_into(model, options, tp, rank, only=self._only(model), experts=experts,
                                 version=agreed.ref)
            _check_all_loaded(model, delivery.loaded, model_config, f"{options.model!r} (rank {rank}/{tp})")
            return delivery, delivery.report

        delivery = on_every_rank(options, group, agreed, "load", load)
        model.raydist_report, model.raydist_model_dir = delivery.report, model_config.model
        model.raydist_served = delivery.served
        logger.info(_describe(delivery.report, pp, time.perf_counter() - t0, delivery.capture, experts is not None,
                              group.size))

    def get_all_weights(self, model_config: ModelConfig, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """What vLLM's in-place reload (``reload_weights``, the weight update of RL loops) reads: the agreed version
        (current, or pinned) of this worker's shard, verified, as full-size tensors. Pulled and verified *before*
        the first tensor is handed over on every worker (:func:`~.handoff.update_rank`: the chunks this worker's
        parameters hold are built from them and the new version's deltas): a reload that any worker fails to pull
        or verify, or that would not give every worker the same version, raises on every worker before vLLM
        changed any weight (the shard is held in host memory meanwhile)."""
        tp, rank, pp = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank(), get_pp_group()
        start_dir = getattr(model, "raydist_model_dir", model_config.model)  # reload(weights_path=) changes the model
        group = TorchGroup.of(get_world_group())
        placed: list = []

        def resolve() -> EngineOptions:
            options = EngineOptions.for_update(self.raw_options, OPTIONS_NAME, start_dir, model_config.model)
            placed.append(_placement(model, tp, rank))
            return options

        options, agreed = agree_version(group, _holder(tp, pp), resolve)
        experts = placed[0]

        served = getattr(model, "raydist_served", None)
        served = served.kept_in(_live_tensors(model)) if served is not None else None

        def pull():
            update = update_rank(options, tp, rank, only=self._only(model), experts=experts, version=agreed.ref,
                                 served=served)
            return update, update.report

        try:
            update = on_every_rank(options, group, agreed, "update", pull)
        except BaseException:
            _restore_layers(model, model_config)
            raise
        logger.info(f"raydist: rank {rank}/{tp}: update to {options.model} version {agreed.ref.version} pulled and "
                    f"verified on every worker ({group.size}); {describe_update(update.report)}")
        model.raydist_served = None  # until every weight is written: a reload failing now leaves nothing to build on
        yield from update.weights
        model.raydist_report, model.raydist_served = update.report, update.served

    @staticmethod
    def _only(model: torch.nn.Module) -> Callable[[str], bool] | None:
        """This pipeline stage's tensors only (None: every tensor)."""
        return _stage_filter(model) if get_pp_group().world_size > 1 else None


SUPPORTED = (
    "tensor_parallel_size, pipeline_parallel_size, enable_expert_parallel (any expert_placement_strategy) and "
    "data_parallel_size (MoE layers then need enable_expert_parallel)"
)
"""The vLLM parallel settings the hand-off models (README: "Engines' parallel settings with raydist")."""


def check_parallel(parallel: ParallelConfig | None) -> None:
    """Refuse, naming each setting, a vLLM parallel configuration the hand-off does not model (a wrong model
    must never load): context parallelism (prefill or decode) and expert load balancing / redundant or elastic
    experts change which bytes a rank holds in ways not read here. MoE layers are checked against their own
    placement in :func:`_placement`."""
    if parallel is None:
        raise ConfigError(
            "raydist: vLLM's config is not set in this worker, so its parallel settings cannot be checked; "
            "load through vLLM's model runner (LLM / vllm serve)"
        )
    refused = [
        f"{name}={value!r}"
        for name, value, modelled in (
            ("prefill_context_parallel_size", parallel.prefill_context_parallel_size, 1),
            ("decode_context_parallel_size", parallel.decode_context_parallel_size, 1),
            ("enable_eplb", parallel.enable_eplb, False),
            ("eplb_config.num_redundant_experts", parallel.eplb_config.num_redundant_experts, 0),
            ("enable_elastic_ep", parallel.enable_elastic_ep, False),
        )
        if value != modelled
    ]
    if refused:
        raise ConfigError(
            f"load format {LOAD_FORMAT!r} does not model vLLM's {', '.join(refused)}: refused before loading (it "
            f"could serve wrong weights). Supported: {SUPPORTED}; start vLLM without those settings, or use its "
            "own loader for them"
        )


def _placement(model: torch.nn.Module, tp: int, rank: int) -> Experts | None:
    """This worker's expert placement, read from the model's own MoE layers (each ``FusedMoE`` knows its local
    experts): an :data:`~raydist_loader.store.experts.Experts` predicate under expert parallelism, None without.
    Checks vLLM's parallel settings first, and refuses an MoE layer whose cut the hand-off does not make."""
    config = get_current_vllm_config_or_none()
    check_parallel(config.parallel_config if config is not None else None)
    placement: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():  # parents first: the MoE runner (``...experts``), then its parts
        manager = getattr(module, "expert_map_manager", None)
        if manager is None or id(manager) in seen:
            continue
        seen.add(id(manager))
        moe = manager.moe_parallel_config
        if getattr(manager, "num_fused_shared_experts", 0):
            raise ConfigError(
                f"{name}: vLLM fused {manager.num_fused_shared_experts} shared expert(s) into the routed experts; "
                f"load format {LOAD_FORMAT!r} does not model that placement. Supported: {SUPPORTED}"
            )
        if moe.use_ep:
            if moe.tp_size != 1:
                raise ConfigError(
                    f"{name}: expert parallelism with experts also cut over {moe.tp_size} TP ranks is not modelled "
                    f"by load format {LOAD_FORMAT!r} (whole experts per rank are). Supported: {SUPPORTED}"
                )
            placement[name] = manager.get_local_expert_ids()
        elif (moe.tp_size, moe.tp_rank) != (tp, rank):
            raise ConfigError(
                f"{name}: vLLM cuts this MoE layer over {moe.tp_size} ranks (rank {moe.tp_rank}: tensor x data x "
                f"context parallel, dp={moe.dp_size}), the hand-off at tp={tp} (rank {rank}): start vLLM with "
                f"enable_expert_parallel=True (or without data_parallel_size). Supported: {SUPPORTED}"
            )
    if not placement:
        return None
    holds = owned_by_layer(placement)
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is None:
        return holds
    return lambda name, expert: holds(mapper.map_name(name) or name, expert)


def _stage_filter(model: torch.nn.Module) -> Callable[[str], bool]:
    """Keep a checkpoint tensor unless the module it belongs to lives on another pipeline stage (vLLM puts a
    PPMissingLayer there). A name the model maps (``hf_to_vllm_mapper``) is checked as mapped. A tensor kept by
    mistake is only bytes that vLLM skips; one dropped by mistake would be caught by the completeness check."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)

    def keep(name: str) -> bool:
        mapped = mapper.map_name(name) if mapper is not None else name
        return not is_pp_missing_parameter(mapped or name, model)

    return keep


def _check_all_loaded(model: torch.nn.Module, loaded: set[str] | None, model_config: ModelConfig, what: str) -> None:
    """Every parameter of the (stage's) model must have been loaded: the check vLLM's default loader makes for
    unquantized models, without its exemptions. Quantized models may legitimately lack some (scales)."""
    if loaded is None or model_config.quantization is not None:
        if loaded is None:
            logger.warning("%s does not report which weights it loaded; completeness not checked", type(model).__name__)
        return
    message = missing_names({name for name, _ in model.named_parameters()}, set(loaded), what)
    if message:
        raise ShardingError(f"{message}; the store's model does not match the config vLLM was started with")


def _restore_layers(model: torch.nn.Module, model_config: ModelConfig) -> None:
    """vLLM's in-place reload puts every layer's parameters on the meta device before it asks for the weights and
    restores them only once ``load_weights`` returns: an update refused before any weight was handed over (on every
    worker) restores them here, so the engine keeps serving the weights it had instead of meta tensors."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, finalize_layerwise_reload
    except ImportError:  # a vLLM without layerwise reloads: nothing was moved
        return
    if any(getattr(LAYERWISE_INFO.get(layer), "kernel_tensors", None) is not None for layer in model.modules()):
        finalize_layerwise_reload(model, model_config)


def _live_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The model's parameters and buffers, and during vLLM's in-place reload (whose layers hold meta tensors
    meanwhile) the kernel tensors it keeps aside and restores after."""
    yield from model.parameters()
    yield from model.buffers()
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:  # a vLLM without layerwise reloads: the parameters are the tensors
        return
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        kept = getattr(info, "kernel_tensors", None) if info is not None else None
        for group in kept or ():
            yield from group.values()


def _holder(tp: int, pp) -> str:
    """Who holds a lease: this engine, as ``versions`` shows it."""
    return f"vllm engine tp={tp} pp={pp.world_size}"


def _describe(
    report: RankReport, pp, seconds: float, capture: Capture | None = None, expert_parallel: bool = False,
    workers: int = 1,
) -> str:
    """One log line per rank."""
    stage = f", pp stage {pp.rank_in_group}/{pp.world_size}" if pp.world_size > 1 else ""
    stage += ", expert parallel (its own experts whole)" if expert_parallel else ""
    verified = "verified" if report.verify else "NOT verified (verify=false)"
    ways = ""
    if capture is not None:
        ph = report.phases
        ways = (
            f"; {len(capture.direct)} tensors read straight into parameters in {ph.get('land_s', 0):.3f} s, "
            f"{len(capture.fallback)} through load_weights in {ph.get('stream_s', 0):.3f} s (capture "
            f"{capture.seconds:.3f} s)"
        )
    return (
        f"raydist: rank {report.rank}/{report.tp}{stage}: {report.model} version {report.version} "
        f"(the version of all {workers} workers) from {report.store}: {report.chunks} chunks, "
        f"{report.bytes / 1e6:.1f} MB; pulled, verified and loaded into the model in {seconds:.2f} s "
        f"({report.bytes / max(seconds, 1e-9) / 1e9:.2f} GB/s), {verified}{ways}"
    )
