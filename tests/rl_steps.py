"""RL weight-update steps shared by the engine scripts (tests/vllm_engine.py, tests/sglang_engine.py, run in the
engines' venvs) and their test modules: a trainer's step as a checkpoint (for the engine's own loader, the
reference) and its publish from memory through one ``UpdatePublisher`` per (store, model), kept across steps as a
trainer process keeps it, so the second publish is stored as deltas of the first."""

from __future__ import annotations

import shutil
from pathlib import Path

_PUBLISHERS: dict[tuple[str, str], object] = {}


def step_checkpoint(src: str | Path, dst: str | Path, *, seed: int, fraction: float = 0.03,
                    size: float = 1e-2) -> str:
    """A copy of checkpoint ``src`` at ``dst`` whose weights moved by ``size`` on ``fraction`` of their elements (a
    trainer's step: most chunks change a little, so a publish stores them as deltas)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(Path(src) / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    moved = {}
    for name, w in weights.items():
        mask = torch.rand(w.shape, generator=gen) < fraction
        moved[name] = (w.float() + size * mask).to(w.dtype) if w.is_floating_point() else w
    save_file(moved, Path(dst) / "model.safetensors")
    return str(dst)


def publish_update(p: dict) -> dict:
    """``p``: ``{"ckpt", "url", "model", "max_tp"}`` and optionally ``"corrupt": True`` (then one byte of one of the
    new version's deltas is flipped in the store). Returns the version and what it stored."""
    from safetensors.torch import load_file

    import raydist_loader as rl

    key = (p["url"], p["model"])
    if key not in _PUBLISHERS:
        _PUBLISHERS[key] = rl.UpdatePublisher(p["url"], p["model"], files_from=p["ckpt"], max_tp=p["max_tp"])
    result = _PUBLISHERS[key].publish(load_file(Path(p["ckpt"]) / "model.safetensors"))
    if p.get("corrupt"):
        _flip_a_delta(p["url"], p["model"])
    return {"version": result.version, "update": result.update}


def _flip_a_delta(url: str, model: str) -> None:
    from raydist_loader.connectors import open_connector
    from raydist_loader.store import versions

    with open_connector(url) as conn:
        m = versions.read_manifest(conn, model)
        obj, offset, nbytes = next(steps[-3:] for t in m.tensors.values() for steps in (t.delta or ()) if steps)
        data = bytearray(conn.read(m.objects[obj]))
        data[offset + nbytes // 2] ^= 0x10
        conn.write(m.objects[obj], bytes(data))
