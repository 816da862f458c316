"""RL weight updates, end to end on one machine: a trainer keeps fp32 master weights, takes a few steps at an RL
learning rate, and publishes each step's bf16 weights from memory; only what changed is stored (XOR deltas,
compressed). A serving engine would update with its own entry point (vLLM ``collective_rpc("reload_weights")``,
SGLang ``update_weights_from_disk(DIR, load_format="raydist")``); here every version is loaded back and checked.

    python examples/rl_updates.py [STORE_URL]        (default: a directory under /tmp)
"""

from __future__ import annotations

import sys
import tempfile

import torch
from safetensors.torch import load_file

import raydist_loader as rl
from raydist_loader.testing.tiny_models import make_tiny_checkpoint


def main(url: str | None = None) -> None:
    work = tempfile.mkdtemp(prefix="raydist-rl-")
    url = url or f"file://{work}/store"
    ckpt = make_tiny_checkpoint("llama", f"{work}/base", dtype=torch.bfloat16)  # config, tokenizer, weights
    master = {k: v.float() for k, v in load_file(f"{ckpt}/model.safetensors").items()}  # the trainer's fp32 copy
    publisher = rl.UpdatePublisher(url, "policy", files_from=ckpt, max_tp=2)
    for step in range(4):
        if step:
            for w in master.values():  # an Adam-like step: about lr per element, at an RL learning rate
                w.add_(torch.randn_like(w).sign_(), alpha=3e-6)
        weights = {k: v.to(torch.bfloat16) for k, v in master.items()}
        result = publisher.publish(weights)
        u = result.update
        print(f"step {step}: version {result.version}: {u['bytes_written'] / 1e3:.1f} kB written for a "
              f"{result.bytes / 1e3:.1f} kB model ({u['whole']} chunks whole, {u['deltas']} as deltas, "
              f"{u['unchanged']} unchanged)")
        shard = rl.load_shard("policy", url, 1, 0, device="cpu")  # a cold load: full chunks + deltas, verified
        assert shard.report.verified and shard.report.version == result.version
        assert all(torch.equal(shard.tensors[k], v) for k, v in weights.items())
    print("every version loaded and verified")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
