"""Layer 5 (entry points): vLLM load format ``raydist``: every TP worker pulls and verifies only its own shard before
vLLM sees a weight.

Registered through the ``vllm.general_plugins`` entry point (see :func:`register`), so it needs no fork and no patch:

    vllm serve DIR --load-format raydist \\
        --model-loader-extra-config '{"url": "redis://host:6379/0", "model": "NAME"}' --tensor-parallel-size 2

``DIR`` holds the model's config and tokenizer files (``raydist-loader pull-files URL --model NAME DIR``) and
``raydist.json``, which names the store when no options are given. Options are the keys of
:data:`raydist_loader.engines.handoff.OPTIONS`. In each worker: tp and rank are vLLM's TP world size and rank; with
pipeline parallelism a stage pulls only the tensors of the modules it owns; the shard lands in host memory as full-size
tensors (see :mod:`.handoff`) and vLLM's own weight loaders narrow and copy each one into its parameter on the worker's
device. Afterwards every parameter of the model must have been loaded, else the load fails with their names. The rank's
load report is left on the model as ``model.raydist_report``. vLLM's in-place ``reload_weights`` (RL weight updates)
pulls the store's current version the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.models.utils import is_pp_missing_parameter

from ..api import open_manifest
from ..errors import ShardingError
from ..report import RankReport
from .handoff import EngineOptions, load_into, missing_names, rank_weights

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
            expect_manifest_sha256=options.expect_manifest_sha256,
            connector_options=options.connector_options(),
        )

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        t0 = time.perf_counter()
        tp, rank, pp = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank(), get_pp_group()
        options = self.options(model_config)
        delivery = load_into(model, options, tp, rank, only=self._only(model))
        seconds = time.perf_counter() - t0
        _check_all_loaded(model, delivery.loaded, model_config, f"{options.model!r} (rank {rank}/{tp})")
        model.raydist_report = delivery.report
        logger.info(_describe(delivery.report, pp, seconds))

    def get_all_weights(self, model_config: ModelConfig, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """What vLLM's in-place reload (``reload_weights``, the weight update of RL loops) reads: the store's current
        version of this worker's shard, verified, as full-size tensors."""
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        weights, report = rank_weights(self.options(model_config), tp, rank, only=self._only(model))
        yield from weights
        model.raydist_report = report()

    @staticmethod
    def _only(model: torch.nn.Module) -> Callable[[str], bool] | None:
        """This pipeline stage's tensors only (None: every tensor)."""
        return _stage_filter(model) if get_pp_group().world_size > 1 else None


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


def _describe(report: RankReport, pp, seconds: float) -> str:
    """One log line per rank."""
    stage = f", pp stage {pp.rank_in_group}/{pp.world_size}" if pp.world_size > 1 else ""
    verified = "verified" if report.verify else "NOT verified (verify=false)"
    return (
        f"raydist: rank {report.rank}/{report.tp}{stage}: {report.model} version {report.version} "
        f"from {report.store}: {report.chunks} chunks, {report.bytes / 1e6:.1f} MB; pulled, verified and loaded "
        f"into the model in {seconds:.2f} s ({report.bytes / max(seconds, 1e-9) / 1e9:.2f} GB/s), {verified}"
    )
