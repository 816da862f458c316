"""Correctness beyond bytes: a TP forward over the loaded shards equals transformers' forward of the model.

Runs without Ray: every rank's ``ShardLoader`` loads in this process and ``examples/tp_llama.py`` computes the
logits from the shards alone (column/row-parallel linears, partial sums added, rowwise bias once, GQA heads,
kv heads replicated at tp > kv_heads, vocab-parallel embedding and lm_head with a short last rank).

transformers initialises biases to zero and norms to one, and its 0.02-std weights make attention almost
uniform; then a misplaced bias, norm or head would hardly show. So each checkpoint is re-randomised here (O(1)
activations, non-trivial biases and norms) before it is published.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from raydist_loader.store.publish import publish
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import load_example, rerandomise

MAX_TP = 4
ATOL = RTOL = 1e-5

# name -> (model_type, config overrides); all have 8 query heads over 2 kv heads, vocab 250 (padded 256).
MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),  # rowwise o_proj/down_proj biases
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "phi3": ("phi3", {}),  # fused qkv_proj and gate_up_proj
}
CASES = [
    *[("llama", tp) for tp in (1, 2, 4)],
    *[("llama_bias", tp) for tp in (2, 4)],
    *[("qwen2", tp) for tp in (1, 2, 4)],
    *[("phi3", tp) for tp in (1, 2, 4)],
]


tp_llama = load_example()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """Every model in MODELS written, re-randomised and published once: name -> (store url, checkpoint)."""
    root = tmp_path_factory.mktemp("tp_forward")
    url = f"file://{root}/store"
    out = {}
    for seed, (name, (model_type, overrides)) in enumerate(MODELS.items()):
        ckpt = make_tiny_checkpoint(model_type, root / name, seed=seed, **overrides)
        rerandomise(ckpt, seed)
        publish(ckpt, url, name, max_tp=MAX_TP)
        out[name] = (url, ckpt)
    return out


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    """Two sequences whose ids hit every rank's vocab rows, including the first and the last id."""
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    ids[0, 0], ids[1, 0], ids[0, 5], ids[1, 5] = 249, 0, 200, 63
    return ids


_reference_cache: dict[str, torch.Tensor] = {}


def _reference(name: str, ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    if name not in _reference_cache:
        _reference_cache[name] = tp_llama.reference_forward(ckpt, ids)
    return _reference_cache[name]


def _runner(shards: list[dict]) -> Callable[..., list[Any]]:
    """``LoadedModel.run`` without Ray: fn(rank, tensors, *args) for every rank, in rank order."""
    return lambda fn, *args: [fn(rank, shards[rank], *args) for rank in range(len(shards))]


@pytest.mark.parametrize(("name", "tp"), CASES, ids=[f"{n}-tp{tp}" for n, tp in CASES])
def test_tp_forward_matches_full_model(published, input_ids, name, tp):
    url, ckpt = published[name]
    shards, metas, config = tp_llama.load_shards_in_process(url, name, tp)
    got = tp_llama.tp_forward(_runner(shards), metas, config, input_ids)
    want = _reference(name, ckpt, input_ids)
    assert got.shape == want.shape == (2, 11, 250)
    assert want.abs().max() > 1.0  # the model is not near-trivial
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def _swap_ranks(shards: list[dict], metas: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ranks 0 and 1 trade their whole shards (and metadata)."""
    shards, metas = list(shards), list(metas)
    shards[0], shards[1] = shards[1], shards[0]
    metas[0], metas[1] = metas[1], metas[0]
    return shards, metas


def _swap_kv_groups(shards: list[dict], metas: list[dict]) -> tuple[list[dict], list[dict]]:
    """At tp=4 over 2 kv heads, ranks 1 and 2 trade k/v (rank 1 should share kv head 0 with rank 0)."""
    shards = [dict(s) for s in shards]
    for key in [k for k in shards[1] if ".k_proj." in k or ".v_proj." in k]:
        shards[1][key], shards[2][key] = shards[2][key], shards[1][key]
    return shards, metas


@pytest.mark.parametrize(
    ("name", "tp", "corrupt"),
    [("llama", 2, _swap_ranks), ("phi3", 2, _swap_ranks), ("qwen2", 4, _swap_kv_groups)],
    ids=["llama-swap-ranks", "phi3-swap-ranks", "qwen2-tp4-swap-kv-replicas"],
)
def test_check_has_teeth(published, input_ids, name, tp, corrupt):
    """Shards in the wrong places give logits far outside the tolerance: the check above has teeth."""
    url, ckpt = published[name]
    shards, metas, config = tp_llama.load_shards_in_process(url, name, tp)
    bad_shards, bad_metas = corrupt(shards, metas)
    got = tp_llama.tp_forward(_runner(bad_shards), bad_metas, config, input_ids)
    want = _reference(name, ckpt, input_ids)
    assert (got - want).abs().max() > 1e3 * ATOL
    assert not torch.allclose(got, want, atol=ATOL, rtol=RTOL)
