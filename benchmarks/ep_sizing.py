"""Expert parallelism (issue 18): per-rank bytes of DeepSeek-V3 (FP8, 256 routed experts) at tp=8 and at EP=8,
both as a chunked store moves them and as a rank reads an in-place (indexed) HF checkpoint, from its config alone.

    python -m benchmarks.ep_sizing --out benchmarks/results/ep_sizing.json

The in-place figures plan over DeepSeek-V3's tensors (built on the meta device, as ``inspect --config-only``)
laid out back to back in one safetensors file in the order transformers names them, with placeholder digests:
a real checkpoint's file split and order change the spans only at file and tensor boundaries. Planning is the
loader's own (``make_plan``), so ``read`` is exactly what a rank would request, coalesced strided rows included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from raydist_loader.store import publish, sizing
from raydist_loader.store.experts import linear
from raydist_loader.store.manifest import new_version
from raydist_loader.store.plan import make_plan
from raydist_loader.store.rules import RuleSet
from tests.test_sizing import DEEPSEEK_V3


def in_place_manifest(config: dict, max_tp: int = 8):
    """An in-place manifest of ``config``'s tensors in one file (placeholder digests)."""
    offset, entries = 0, []
    for e in sizing.meta_entries(config):
        entries.append(dataclasses.replace(e, offset=offset))
        offset += e.nbytes
    rules = RuleSet.for_checkpoint(config, None)
    cuts = publish.plan_cuts(entries, config, rules, max_tp)
    for c in cuts:
        c.start(["xxh3_128"])
        c.xxh3[:] = ["0" * 32] * len(c.chunks)
    return publish._new_manifest(  # the record builder index uses, no file read
        "deepseek-v3", new_version("deepseek-v3"), "inplace", max_tp, ["xxh3_128"], rules, config, cuts, {},
        objects=["deepseek-v3/model.safetensors"], sources={c.entry.name: [0, c.entry.offset] for c in cuts},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    manifest = in_place_manifest(DEEPSEEK_V3)
    names = list(manifest.tensors)
    rows = []
    for label, experts in (("tp=8", None), ("ep=8", linear(names, 8, 0))):
        plan = make_plan(manifest, 8, 0, experts=experts)
        rows.append({"parallelism": label, "rank": 0, "bytes": plan.bytes_kept, "in_place_read": plan.bytes_read,
                     "reads": len(plan.reads)})
        print(f"{label}: rank 0 moves {plan.bytes_kept / 1e9:.2f} GB; in place it reads {plan.bytes_read / 1e9:.2f} GB "
              f"in {len(plan.reads)} chunk reads")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "DeepSeek-V3 (config.json, FP8 128x128)", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
