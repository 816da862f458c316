"""What a rank's shard must hold, derived from the full tensor and the shard's metadata (shared by tests)."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raydist_loader.store.grid import padded_vocab
from raydist_loader.testing.tiny_models import TINY_DEFAULTS, make_tiny_checkpoint

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tp_llama.py"


def publish_cases(root: Path, cases, max_tp: int) -> dict[tuple[str, str], tuple[str, Path]]:
    """Each (model_type, layout) of ``cases`` as a tiny checkpoint in a file store under ``root``: published
    ("chunked") or copied and indexed ("in-place"). Returns (model_type, layout) -> (store url, checkpoint dir)."""
    import raydist_loader as rl

    out = {}
    for model_type, layout in cases:
        ckpt = make_tiny_checkpoint(model_type, root / f"ckpt-{model_type}-{layout}")
        url = f"file://{root}/store-{layout}"
        if layout == "in-place":
            shutil.copytree(ckpt, root / f"store-{layout}" / model_type)
            rl.index(url, model_type, max_tp=max_tp)
        else:
            rl.publish(ckpt, url, model_type, max_tp=max_tp)
        out[(model_type, layout)] = (url, ckpt)
    return out


def original_tensors(ckpt) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def expected_slice(full: torch.Tensor, meta: dict) -> torch.Tensor:
    """The rank's segments of ``full`` concatenated on the split dim (the whole tensor when replicated)."""
    if meta["dim"] is None:
        return full
    parts = [full.narrow(meta["dim"], a, b - a) for a, b in meta["segments"].values()]
    return torch.cat(parts, meta["dim"]) if parts else full.narrow(meta["dim"], 0, 0)


def assert_shards_match(original: dict[str, torch.Tensor], shards: list[tuple[dict, dict]]) -> None:
    """Every rank's tensors equal their expected slices, and the ranks together cover each split tensor."""
    for name, full in original.items():
        covered: set[int] = set()
        for rank, (tensors, metadata) in enumerate(shards):
            meta = metadata[name]
            got = tensors[name]
            assert got.dtype == full.dtype and list(got.shape) == meta["shape"], (name, rank)
            assert torch.equal(got, expected_slice(full, meta)), (name, rank)
            if meta["dim"] is not None:
                covered.update(i for a, b in meta["segments"].values() for i in range(a, b))
        dim = shards[0][1][name]["dim"]
        if dim is not None:
            assert covered == set(range(full.shape[dim])), f"{name}: the ranks do not cover the tensor"


def vllm_cut(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of a tiny Qwen3-MoE weight, written from vLLM's parallel layers (independent of the
    chunk grid): q/gate/up rows and o/down columns split evenly, k/v by kv head (replicated past 2 kv heads),
    vocab rows padded to 64, everything else whole."""
    kv_heads, head_dim = TINY_DEFAULTS["qwen3_moe"]["num_key_value_heads"], TINY_DEFAULTS["qwen3_moe"]["head_dim"]

    def even(dim: int) -> torch.Tensor:
        per = full.shape[dim] // tp
        return full.narrow(dim, rank * per, per)

    if name.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")):
        return even(0)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return even(1)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        if tp <= kv_heads:
            return even(0)
        head = rank // (tp // kv_heads)
        return full[head * head_dim : (head + 1) * head_dim]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        vocab = full.shape[0]
        per = padded_vocab(vocab) // tp
        return full[min(vocab, rank * per) : min(vocab, (rank + 1) * per)]
    return full  # norms, q_norm/k_norm, the router


def vllm_cut_mismatches(original: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], tp: int, rank: int):
    """Names of the tensors that are missing, extra, or differ from :func:`vllm_cut`."""
    missing = sorted(set(original) ^ set(tensors))
    return missing + [n for n, full in original.items() if n in tensors and not torch.equal(
        tensors[n], vllm_cut(n, full, tp, rank))]


def assert_vllm_cut(original: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], tp: int, rank: int) -> None:
    wrong = vllm_cut_mismatches(original, tensors, tp, rank)
    assert not wrong, f"rank {rank}: {len(wrong)} tensors differ from vLLM's cut, e.g. {wrong[:3]}"


def actor_vllm_cut_mismatches(rank: int, tensors: dict[str, torch.Tensor], ckpt: str, tp: int) -> list[str]:
    """Run next to a rank's shard (``LoadedModel.run``): :func:`vllm_cut_mismatches` against the checkpoint."""
    return vllm_cut_mismatches(original_tensors(Path(ckpt)), tensors, tp, rank)


def load_example():
    """examples/tp_llama.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tp_llama_example", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that cloudpickle can ship it to Ray actors by value
    spec.loader.exec_module(module)
    return module


def rerandomise(ckpt: Path, seed: int) -> None:
    """Rewrite model.safetensors with well-scaled random weights, non-zero biases and non-unit norms."""
    path = ckpt / "model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    state = load_file(path)
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            new = 1.0 + 0.3 * noise
        elif name.endswith(".bias"):
            new = 0.5 * noise
        elif "embed_tokens" in name:
            new = noise
        else:  # a linear weight [out, in]: unit-variance outputs, slightly larger for peaky attention
            new = noise * (1.5 / math.sqrt(t.shape[1]))
        state[name] = new.to(t.dtype).contiguous()
    save_file(state, path, metadata={"format": "pt"})


def flip_one_byte(url: str, model: str, tensor: str, chunk: str) -> str:
    """Flip one byte in the middle of ``tensor``'s chunk ``chunk`` of the model's current version, in place, in any
    store (the object is read and written back whole); returns the object's name."""
    from raydist_loader.connectors import open_connector
    from raydist_loader.store.versions import read_manifest

    with open_connector(url) as conn:
        record = next(c for c in read_manifest(conn, model).chunks(tensor) if c.id == chunk)
        part = record.parts[0]
        data = bytearray(conn.read(part.object))
        data[part.offset + part.nbytes // 2] ^= 0x01
        conn.write(part.object, bytes(data))
    return part.object


def corrupt_copy(tmp: Path, src_url: str, model: str, tensor: str, chunk: str) -> str:
    """A copy of the file store ``src_url`` (in ``tmp/corrupt-store``) with one byte flipped inside ``tensor``'s
    chunk ``chunk``; returns the copy's URL."""
    dst = Path(tmp) / "corrupt-store"
    shutil.copytree(Path(src_url.removeprefix("file://")), dst)
    flip_one_byte(f"file://{dst}", model, tensor, chunk)
    return f"file://{dst}"


def stored_manifest(url: str, model: str) -> bytes:
    """The current version's manifest exactly as stored (``<model>/<version>/manifest.json``; in a store of the
    layout before versions, ``<model>/manifest.json``)."""
    from raydist_loader.connectors import open_connector
    from raydist_loader.store.versions import read_current, version_manifest_key

    with open_connector(url) as conn:
        cur = read_current(conn, model)
        return cur.legacy if cur.legacy is not None else conn.read(version_manifest_key(model, cur.version))


def single_manifest_layout(url: str, model: str) -> str:
    """Turn the model's store into the layout raydist-loader wrote before versions: the current version's manifest
    (with the swap time and retired versions it recorded then) at ``<model>/manifest.json``, no pointer, no
    manifest object of any version. Tests that edit a manifest in place (hostile stores) edit it there: nothing
    else (a pointer's sha256) has to follow the edit. Returns the version."""
    import json

    from raydist_loader.connectors import open_connector
    from raydist_loader.store.manifest import manifest_key
    from raydist_loader.store.versions import read_current, version_manifest_key

    with open_connector(url) as conn:
        cur = read_current(conn, model)
        if cur.legacy is not None:
            return cur.version
        doc = json.loads(conn.read(version_manifest_key(model, cur.version)))
        doc["created"], doc["retired"] = cur.since, cur.retired or None
        conn.write(manifest_key(model), json.dumps({k: v for k, v in doc.items() if v is not None}).encode())
        for version in [cur.version, *cur.retired]:
            if conn.exists(version_manifest_key(model, version)):
                conn.delete(version_manifest_key(model, version))
    return cur.version


def faulty_site(tmp: Path) -> str:
    """A directory (put it on ``PYTHONPATH``) with a ``sitecustomize`` that registers ``faulty+`` in every Python
    process started with it: an engine's spawned workers inherit the environment, not this process' registry."""
    site = Path(tmp) / "faulty-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "try:\n    from raydist_loader.testing.faulty import FaultyConnector\n    FaultyConnector.register()\n"
        "except Exception:\n    pass\n"
    )
    return str(site)
