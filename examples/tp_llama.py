"""A tensor-parallel Llama-family forward built only from the shards raydist_loader hands each rank.

Each rank holds its slice of every weight (DESIGN.md, "The shard contract"), as vLLM lays them out:

* colwise (``q/k/v_proj``, ``gate/up_proj``, phi3's fused ``qkv_proj`` / ``gate_up_proj``): this rank's output
  rows, i.e. its attention heads and its slice of the MLP's intermediate dim;
* rowwise (``o_proj``, ``down_proj``): the matching input columns, so each rank produces a *partial* hidden
  state and the partials add up to the full one (the all-reduce); a rowwise bias is added by rank 0 only;
* vocab (``embed_tokens``, ``lm_head``): rows ``[min(V, r*per), min(V, (r+1)*per))`` with
  ``per = padded_vocab / tp``;
* norms: replicated, so every rank can apply them itself.

The per-rank functions have the signature ``fn(rank, tensors, metas, config, *args)``: ``tensors`` is the
rank's shard dict (HF name -> tensor), ``metas`` the per-rank metadata in rank order
(``ShardLoader.metadata()`` or ``LoadedModel.metadata(r)``) and ``config`` the checkpoint's config.json as a
dict. The driver :func:`tp_forward` only needs ``run(fn, *args)``, which calls ``fn(rank, tensors, *args)`` on
every rank and returns the results in rank order: exactly ``LoadedModel.run`` (with Ray, make this module
picklable by value, e.g. ``cloudpickle.register_pickle_by_value(module)``, since the actors cannot import
``examples/``), or, in one process::

    run = lambda fn, *args: [fn(r, shards[r], *args) for r in range(tp)]

Supported: llama, mistral, qwen2 (q/k/v biases) and phi3 (fused weights), with GQA, default RoPE (including
phi3's ``partial_rotary_factor``) and causal attention without sliding windows (fine for short inputs).

Run ``python examples/tp_llama.py`` for a demo: a tiny GQA llama, published to a temporary file store, loaded
at tp=2 in this process and compared with transformers' own forward.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Run = Callable[..., list[Any]]
"""``run(fn, *args)`` -> ``[fn(0, tensors_0, *args), fn(1, tensors_1, *args), ...]``."""

SUPPORTED = ("llama", "mistral", "qwen2", "phi3")


# ------------------------------------------------------------------------------------------ config helpers
def head_dim(config: dict) -> int:
    """Per-head size: config ``head_dim`` when given, else hidden_size / num_attention_heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_theta(config: dict) -> float:
    """RoPE base; transformers 5 keeps it in ``rope_parameters``, older configs at the top level."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _check_supported(config: dict) -> None:
    if config["model_type"] not in SUPPORTED:
        raise ValueError(f"model_type {config['model_type']!r} is not one of {SUPPORTED}")
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"only default RoPE is implemented here, not {rope_type!r}")


# ------------------------------------------------------------------------------------------ building blocks
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as in HF Llama: normalise in fp32, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(config: dict, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, rotary_dim] as LlamaRotaryEmbedding builds them (frequencies repeated twice)."""
    partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    dim = int(head_dim(config) * partial)
    inv_freq = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of x [B, heads, T, head_dim] (HF's rotate_half convention)."""
    dim = cos.shape[-1]
    rot, keep = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, keep), dim=-1)


def _linear(x: torch.Tensor, tensors: dict, prefix: str) -> torch.Tensor:
    """x @ W.T (+ b) with this rank's slice of ``prefix.weight`` (and ``prefix.bias`` when present)."""
    return F.linear(x, tensors[f"{prefix}.weight"], tensors.get(f"{prefix}.bias"))


def _rowwise(rank: int, x: torch.Tensor, tensors: dict, prefix: str) -> torch.Tensor:
    """Row-parallel linear: this rank's columns give a partial sum; the replicated bias is added on rank 0."""
    out = F.linear(x, tensors[f"{prefix}.weight"])
    bias = tensors.get(f"{prefix}.bias")
    return out + bias if bias is not None and rank == 0 else out


def _split_fused(rank: int, metas: Sequence[dict], name: str, fused: torch.Tensor) -> list[torch.Tensor]:
    """Split a rank's fused colwise output ([q_r; k_r; v_r] or [gate_r; up_r]) by its segment sizes."""
    segments = metas[rank][name]["segments"]
    return list(fused.split([end - start for start, end in segments.values()], dim=-1))


# ------------------------------------------------------------------------------------------ per-rank parts
def embed_partial(rank: int, tensors: dict, metas: Sequence[dict], config: dict,
                  input_ids: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel embedding: this rank's rows for the ids it holds, zeros elsewhere (partials sum up)."""
    name = "model.embed_tokens.weight"
    weight = tensors[name]
    start, end = metas[rank][name]["segments"]["all"]
    mine = (input_ids >= start) & (input_ids < end)
    if end == start:  # an empty last rank (vocab padding): contributes nothing
        return torch.zeros(*input_ids.shape, weight.shape[1], dtype=weight.dtype)
    local = torch.where(mine, input_ids - start, torch.zeros_like(input_ids))
    return weight[local] * mine[..., None].to(weight.dtype)


def _qkv(rank: int, tensors: dict, metas: Sequence[dict], config: dict, prefix: str,
         x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's q, k, v projections [B, T, *] (separate q/k/v_proj, or phi3's fused qkv_proj)."""
    if f"{prefix}.qkv_proj.weight" in tensors:
        fused = _linear(x, tensors, f"{prefix}.qkv_proj")
        q, k, v = _split_fused(rank, metas, f"{prefix}.qkv_proj.weight", fused)
        return q, k, v
    return tuple(_linear(x, tensors, f"{prefix}.{p}_proj") for p in "qkv")  # type: ignore[return-value]


def attention_partial(rank: int, tensors: dict, metas: Sequence[dict], config: dict, layer: int,
                      hidden: torch.Tensor) -> torch.Tensor:
    """input_layernorm + self-attention over this rank's heads; returns its partial o_proj output [B,T,H].

    The rank has ``nq`` query heads and ``nkv`` kv heads (``nkv`` is 1 when kv heads are replicated, tp >
    kv_heads); each kv head serves ``nq // nkv`` consecutive query heads, as in GQA.
    """
    prefix = f"model.layers.{layer}"
    x = rms_norm(hidden, tensors[f"{prefix}.input_layernorm.weight"], config["rms_norm_eps"])
    q, k, v = _qkv(rank, tensors, metas, config, f"{prefix}.self_attn", x)
    batch, seq, _ = x.shape
    hd = head_dim(config)
    q, k, v = (t.view(batch, seq, -1, hd).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
    cos, sin = rope_cos_sin(config, torch.arange(seq))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    context = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)  # [B, T, nq * hd]: this rank's columns
    return _rowwise(rank, context, tensors, f"{prefix}.self_attn.o_proj")


def mlp_partial(rank: int, tensors: dict, metas: Sequence[dict], config: dict, layer: int,
                hidden: torch.Tensor) -> torch.Tensor:
    """post_attention_layernorm + SwiGLU MLP on this rank's intermediate slice; partial down_proj [B,T,H]."""
    prefix = f"model.layers.{layer}"
    x = rms_norm(hidden, tensors[f"{prefix}.post_attention_layernorm.weight"], config["rms_norm_eps"])
    if f"{prefix}.mlp.gate_up_proj.weight" in tensors:
        fused = _linear(x, tensors, f"{prefix}.mlp.gate_up_proj")
        gate, up = _split_fused(rank, metas, f"{prefix}.mlp.gate_up_proj.weight", fused)
    else:
        gate = _linear(x, tensors, f"{prefix}.mlp.gate_proj")
        up = _linear(x, tensors, f"{prefix}.mlp.up_proj")
    return _rowwise(rank, F.silu(gate) * up, tensors, f"{prefix}.mlp.down_proj")


def logits_partial(rank: int, tensors: dict, metas: Sequence[dict], config: dict,
                   hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + this rank's lm_head rows: [B, T, padded_vocab / tp], zero-filled past the vocab."""
    x = rms_norm(hidden, tensors["model.norm.weight"], config["rms_norm_eps"])
    meta = metas[rank]["lm_head.weight"]
    per = meta["padded_vocab"] // len(metas)
    logits = F.linear(x, tensors["lm_head.weight"])
    return F.pad(logits, (0, per - logits.shape[-1]))  # a short last rank, as vLLM pads it


# ------------------------------------------------------------------------------------------ the driver
def all_reduce(partials: list[torch.Tensor]) -> torch.Tensor:
    """Sum the ranks' partial results (what NCCL's all-reduce does on real GPUs)."""
    return torch.stack(partials).sum(dim=0)


@torch.no_grad()
def tp_forward(run: Run, metas: Sequence[dict], config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM whose weights live as TP shards, one per rank, behind ``run``."""
    _check_supported(config)
    if "lm_head.weight" not in metas[0]:
        raise ValueError("tied embeddings (no lm_head.weight) are not handled by this example")
    metas = list(metas)
    hidden = all_reduce(run(embed_partial, metas, config, input_ids))
    for layer in range(config["num_hidden_layers"]):
        hidden = hidden + all_reduce(run(attention_partial, metas, config, layer, hidden))
        hidden = hidden + all_reduce(run(mlp_partial, metas, config, layer, hidden))
    slices = run(logits_partial, metas, config, hidden)
    return torch.cat(slices, dim=-1)[..., : config["vocab_size"]]  # drop the vocab padding


@torch.no_grad()
def reference_forward(ckpt_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unsharded checkpoint, computed by transformers itself in fp32 (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()(input_ids=input_ids).logits


def load_shards_in_process(url: str, model: str, tp: int) -> tuple[list[dict], list[dict], dict]:
    """Every rank's (tensors, metadata) loaded in this process, plus the config: no Ray needed."""
    from raydist_loader.connectors import open_connector
    from raydist_loader.load.worker import ShardLoader
    from raydist_loader.store.manifest import Manifest
    from raydist_loader.store.versions import read_manifest_bytes

    with open_connector(url) as conn:
        raw = read_manifest_bytes(conn, model)[1]
    shards, metas = [], []
    for rank in range(tp):
        loader = ShardLoader(url, raw, tp, rank, device="cpu")
        report = loader.load()
        if report.failures:
            raise RuntimeError(f"rank {rank}: digest mismatch {report.failures}")
        shards.append(loader.tensors)
        metas.append(loader.metadata())
        loader.close()
    return shards, metas, Manifest.from_json(raw).config


def main(tp: int = 2) -> float:
    """Demo: tiny GQA llama -> temporary file store -> tp shards in this process -> compare with HF."""
    from raydist_loader.store.publish import publish
    from raydist_loader.testing.tiny_models import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint("llama", Path(tmp) / "ckpt")  # 8 query heads over 2 kv heads
        url = f"file://{tmp}/store"
        publish(ckpt, url, "tiny-llama", max_tp=4)
        shards, metas, config = load_shards_in_process(url, "tiny-llama", tp)

        def run(fn: Callable[..., Any], *args: Any) -> list[Any]:
            return [fn(rank, shards[rank], *args) for rank in range(tp)]

        input_ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
        got = tp_forward(run, metas, config, input_ids)
        want = reference_forward(ckpt, input_ids)
    diff = (got - want).abs().max().item()
    print(f"tp={tp}: logits {tuple(got.shape)}, max abs diff vs transformers = {diff:.3g}")
    return diff


if __name__ == "__main__":
    main()
