"""Staging memory does not grow with the largest tensor (issue 10, item 4): a process that loads one big row-parallel
tensor with ``load_shard`` grows by its shard plus at most (concurrency + 1) staging parts, on the chunked and the
in-place layouts, at tp=1 and tp=2.

The issue's case is a 1 GB tensor ([2048, 262144] bf16) with 64 MiB parts: growth <= shard + 320 MiB (5 x 64 MiB).
Here everything is scaled by 1/4: a 256 MiB tensor and 16 MiB parts, growth <= shard + 5 x 16 MiB + 32 MiB for the
interpreter and allocator. Before parts, the in-place span was read whole and cut (measured on this tensor: shard +
550 MiB at tp=1, + 422 MiB at tp=2), and a chunk bigger than a batch slot went through a ring of two buffers of its
own size (published at max_tp 2 the chunks are 128 MiB: + 294 / + 165 MiB): all four fail this bound.
"""

from __future__ import annotations

import os

import pytest

import raydist_loader as rl
from raydist_loader.testing.memory import load_growth, tensor_xxh3, verify_growth, write_big_tensor

ROWS, COLS = 1024, 131072  # bf16: 256 MiB
PART = 16 << 20
CONCURRENCY = 4
SLACK = 32 << 20


@pytest.fixture(scope="module")
def big_tensor_stores(tmp_path_factory):
    """One 256 MiB row-parallel tensor, published (max_tp 2: 128 MiB chunks) and indexed in place."""
    root = tmp_path_factory.mktemp("memory")
    weight = write_big_tensor(root / "ckpt", ROWS, COLS)
    url = f"file://{root}/store"
    rl.publish(root / "ckpt", url, "chunked", max_tp=2)
    (root / "store" / "inplace").mkdir()
    for f in (root / "ckpt").iterdir():
        os.link(f, root / "store" / "inplace" / f.name)
    rl.index(url, "inplace", max_tp=2)
    return url, weight


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model", ["chunked", "inplace"])
def test_loading_a_big_tensor_grows_the_process_by_its_shard_plus_bounded_staging(big_tensor_stores, model, tp):
    url, weight = big_tensor_stores
    got = load_growth(url, model, tp, part_bytes=PART, concurrency=CONCURRENCY)
    cols = COLS // tp
    assert got["verified"] and got["shape"] == [ROWS, cols] and got["shard"] == ROWS * cols * 2
    assert got["xxh3"] == tensor_xxh3(weight[:, :cols]), "rank 0 holds the first half of the columns, exactly"
    bound = got["shard"] + (CONCURRENCY + 1) * PART + SLACK
    assert got["growth"] <= bound, (
        f"{model} tp={tp}: the process grew {got['growth'] / 2**20:.0f} MiB for a {got['shard'] / 2**20:.0f} MiB "
        f"shard (bound {bound / 2**20:.0f} MiB)"
    )


@pytest.mark.parametrize("model", ["chunked", "inplace"])
def test_verifying_a_store_with_a_big_tensor_reads_it_in_bounded_parts(big_tensor_stores, model):
    """``raydist-loader verify`` re-reads every byte: it must not hold a whole tensor (an in-place span was read whole
    and its chunks cut out of it: 2x the tensor per thread), only (part + the chunks' rows cut from it) per thread."""
    url, _ = big_tensor_stores
    got = verify_growth(url, model, part_bytes=PART, concurrency=CONCURRENCY)
    assert got["ok"] and got["bytes"] >= ROWS * COLS * 2 and not got["failures"]
    bound = CONCURRENCY * 2 * PART + SLACK
    assert got["growth"] <= bound, (
        f"verify of {model} grew the process by {got['growth'] / 2**20:.0f} MiB for a 256 MiB tensor "
        f"(bound {bound / 2**20:.0f} MiB)"
    )
