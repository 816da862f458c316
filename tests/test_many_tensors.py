"""A Qwen3-30B-A3B-shaped checkpoint (18,867 tensors at tiny sizes): the manifest stays small and a rank's shard is
exactly vLLM's cut of every tensor. Timings are in benchmarks/many_tensors.py, not asserted here."""

from __future__ import annotations

import raydist_loader as rl

from .shards import assert_vllm_cut, original_tensors, stored_manifest

MAX_MANIFEST_BYTES = 10 * 1024 * 1024


def test_the_manifest_of_19k_tensors_stays_small(many_tensor_moe):
    ckpt, url = many_tensor_moe
    size = len(stored_manifest(url, "moe"))
    assert size <= MAX_MANIFEST_BYTES, f"manifest is {size / 2**20:.1f} MiB"
    summary = rl.inspect(url, "moe", tp=4)
    assert len(summary["tensors"]) == 18_867 and summary["served_tp"] == [1, 2, 4]
    assert sum(r["bytes"] for r in summary["ranks"]) > summary["bytes"]  # replicated tensors count on every rank
    assert summary["bytes"] == sum(t.nbytes for t in original_tensors(ckpt).values())


def test_load_shard_at_tp4_is_vllms_cut_of_every_tensor(many_tensor_moe):
    ckpt, url = many_tensor_moe
    original = original_tensors(ckpt)
    shard = rl.load_shard("moe", url, 4, 3, device="cpu")
    assert shard.report.verified and shard.report.chunks == 18_867  # one chunk per tensor at tp = max_tp
    assert_vllm_cut(original, shard.tensors, 4, 3)
