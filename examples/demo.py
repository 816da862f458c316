"""The main job end to end on this machine: publish -> inspect -> verify -> load at tp=2 on Ray -> TP forward check.

Run with ``bash scripts/demo.sh`` (it sets up .venv first). Everything lands under /tmp/raydist-demo*; nothing is
downloaded: the model is a small random Llama (GQA) written by transformers' ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

import raydist_loader as rl
from raydist_loader.cli import main as cli
from raydist_loader.cli import print_report
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

HERE = Path(__file__).resolve().parent
STORE = "file:///tmp/raydist-demo-store"  # the store configs/local-demo.yaml loads from
MODEL = "tiny-llama"


def _tp_example():
    """examples/tp_llama.py, shipped to the actors by value (examples/ is not an installed package)."""
    from ray import cloudpickle

    sys.path.insert(0, str(HERE))
    import tp_llama

    cloudpickle.register_pickle_by_value(tp_llama)
    return tp_llama


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/raydist-demo")
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(STORE.removeprefix("file://"), ignore_errors=True)
    _step("1. a small Llama checkpoint (random weights, real HF names, GQA 8 q / 2 kv heads)")
    ckpt = make_tiny_checkpoint("llama", work / "ckpt", dtype=torch.float32, hidden_size=256, intermediate_size=512,
                                num_hidden_layers=4, vocab_size=1000)
    print(f"wrote {ckpt} ({sum(p.stat().st_size for p in ckpt.iterdir()) / 1e6:.1f} MB)")

    _step(f"2. raydist-loader publish {ckpt} {STORE} --model {MODEL}")
    if cli(["publish", str(ckpt), STORE, "--model", MODEL]):
        return 1
    _step(f"3. raydist-loader inspect {STORE} --model {MODEL} --tp {args.tp}")
    cli(["inspect", STORE, "--model", MODEL, "--tp", str(args.tp)])
    _step(f"4. raydist-loader verify {STORE} --model {MODEL}")
    if cli(["verify", STORE, "--model", MODEL]):
        return 1

    _step(f"5. load_across_cluster({MODEL!r}, {STORE!r}, tp={args.tp}) on a local Ray")
    tp_llama = _tp_example()
    with rl.load_across_cluster(MODEL, STORE, tp=args.tp, device="auto", ray_address="local",
                                progress=False) as loaded:
        print_report(loaded.report)
        _step("6. TP forward over the shards (each actor computes its partial sums) vs the unsharded model")
        config = json.loads((ckpt / "config.json").read_text())
        metas = [loaded.metadata(r) for r in range(args.tp)]
        ids = torch.tensor([[1, 17, 256, 511, 999, 42, 7, 640]])
        logits = tp_llama.tp_forward(loaded.run, metas, config, ids)
    reference = tp_llama.reference_forward(ckpt, ids)
    diff = (logits - reference).abs().max().item()
    ok = torch.allclose(logits, reference, atol=1e-5, rtol=1e-5)
    print(f"logits {tuple(logits.shape)}: max |tp - full| = {diff:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
