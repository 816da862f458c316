"""The benchmark's one command works on a fresh checkout (issue 12): tracked files only, a tiny size, one backend.

A fresh clone has no ``benchmarks/node/node_modules`` and no cached checkpoint, so ``run.sh`` must install s3rver
from the tracked lockfile (``npm ci``), generate the model, publish it to s3rver and time every way. The copy shares
the running interpreter's venv (a symlink) so that only the benchmark's own set-up is exercised, not a Python install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_copy(dest: Path) -> None:
    """What ``git clone`` would give, with the working tree's current contents (uncommitted edits included)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is left out, as a commit would
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_benchmark_one_command_on_a_fresh_checkout(tmp_path: Path) -> None:
    if not (REPO / ".git").exists() or sys.prefix == sys.base_prefix:
        pytest.skip("needs a git checkout and a venv to share with the copy")
    checkout = tmp_path / "checkout"
    _tracked_copy(checkout)
    assert not (checkout / "benchmarks" / "node" / "node_modules").exists()
    (checkout / ".venv").symlink_to(sys.prefix)
    out = tmp_path / "results"
    proc = _run_sh(checkout, "--gb", "0.02", "--runs", "1", "--backends", "s3", "--out", str(out))
    assert "npm ci" in proc.stdout  # installed from the lockfile, as a new user's first run does
    result = json.loads((out / "latest.json").read_text())
    ways = {w["way"]: w for w in result["ways"].values() if w["backend"] == "s3"}
    assert {"ours tp=1", "ours tp=2", "boto3 8x16MiB ranges", "Run:ai streamer"} <= set(ways)
    assert all(w["gbps"] > 0 for w in ways.values())
    assert ways["ours tp=1"]["bytes"] >= 0.9 * result["meta"]["checkpoint_bytes"]  # the whole model moved at tp=1
    assert (out / "latest.png").stat().st_size > 0
    # issue 14: publish rows beside their peers, the demo model's time to ready by phase, and the targets
    publish = {w["way"] for w in result["ways"].values() if w["backend"] == "publish"}
    assert {"s3: ours publish", "s3: boto3 upload_file 8 threads"} <= publish
    ready = {w["way"]: w for w in result["ways"].values() if w["backend"] == "ready"}
    assert set(ready) == {"join a running cluster", "private local Ray"}
    phases = ["manifest", "connect", "placement", "actors", "pull", "verify"]
    assert all(list(w["phases"]) == phases and w["seconds"] > 0 for w in ready.values())
    targets = {(t["backend"], t["way"], t["what"]) for t in result["targets"] if t["issue"] == 14}
    assert ("s3", "ours load_shard", "x ours tp=1") in targets
    assert ("publish", "s3: ours publish", "x s3: boto3 upload_file 8 threads") in targets
    assert {w for g, w, _ in targets if g == "ready"} == set(ready)

    # A partial node_modules (the defect of issue 12: every dist/ folder dropped) is reinstalled, not trusted.
    dist = checkout / "benchmarks" / "node" / "node_modules" / "path-to-regexp" / "dist"
    shutil.rmtree(dist)
    assert "npm ci" in _run_sh(checkout, "--help").stdout  # set-up only: bench.py --help exits at once
    assert (dist / "index.js").is_file()


def _run_sh(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    """``bash benchmarks/run.sh ARGS`` in ``checkout``; it must succeed."""
    proc = subprocess.run(
        ["bash", "benchmarks/run.sh", *args], cwd=checkout, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


# ------------------------------------------------------------------------------------------------ issue 27
def test_updates_benchmark_trainer_summary_and_paper_estimate() -> None:
    """benchmarks/updates.py without an engine: the calibrated trainer changes about the asked fraction of bf16
    elements, the ranks' update lines are read back per update, the medians give the targets, and the paper
    estimate adds up."""
    import torch

    from benchmarks import updates

    gen = torch.Generator().manual_seed(0)
    trainer = updates.Trainer({"w": (torch.randn(256, 512, generator=gen) * 0.02).to(torch.bfloat16)}, betas=(0, 0))
    lr = trainer.calibrate(0.05)
    changed = [trainer.step(lr) for _ in range(2)]
    assert 0.02 < changed[0] < changed[1] < 0.08, changed

    line = ("raydist: rank {r}/2: m version v from redis://h:1/0: 93 chunks, 24.9 MB; pulled and verified for a "
            "weight update, verified; {n} of 93 chunks built from the weights served, {mb} MB read from the store "
            "for a 24.9 MB shard\n")
    text = "".join(line.format(r=r, n=n, mb=mb) for n, mb in ((0, 24.9), (93, 1.5)) for r in (1, 0))
    lines = updates.update_lines(text)
    assert [[x["reused"] for x in u] for u in lines] == [[0, 0], [93, 93]]
    step = {"changed": 0.05, "publish_s": 1.0, "update_s": 1.0, "delta_s": 2.0, "disk_s": 5.0, "disk_save_s": 2.0,
            "disk_update_s": 3.0, "publish_store_in": 60, "publish_store_out": 1, "update_store_in": 1,
            "update_store_out": 70, "version": "v2"}
    result = {"steps": [dict(step), dict(step)], "raydist_updates": ["back", "update"] * 2,
              "check": {"equal": True, "max_logprob_diff": 0.0}}
    updates.attach_lines(result, lines + lines)
    assert result["steps"][1]["update_ranks"][0]["reused"] == 93
    s = updates.summary(result, 1000)
    assert s["medians"]["engine_read_bytes"] == 3.0e6
    assert [t["met"] for t in s["targets"]] == [True, True, True, True]

    paper = updates.paper_estimate()
    for case in paper["cases"].values():
        assert case["total_s"] == case["publish_s"] + case["read_s"] + case["rebuild_s"] > 0
    with pytest.raises(SystemExit):
        updates.main(["--engines", "nope"])
