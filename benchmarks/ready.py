"""Time to ready of the demo model (examples/demo.py's 11 MB Llama) at tp=2, in a fresh driver process (issue 14).

    python -m benchmarks.ready URL ADDRESS      (ADDRESS: a running cluster's GCS address, or "local")

Run by bench.py as a subprocess, so each call starts as a user's would: nothing of Ray connected in the process.
Prints one JSON line: the report's phases and its call-to-verified seconds (the clock starts at the
``load_across_cluster()`` call, after Python and the package are imported).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODEL = "tiny-llama"
TP = 2


def demo_checkpoint(dest: Path) -> Path:
    """The demo's checkpoint (same shapes as examples/demo.py), made once."""
    import torch

    from raydist_loader.testing.tiny_models import make_tiny_checkpoint

    if (dest / "config.json").exists():
        return dest
    return make_tiny_checkpoint("llama", dest, dtype=torch.float32, hidden_size=256, intermediate_size=512,
                                num_hidden_layers=4, vocab_size=1000)


def main(argv: list[str]) -> int:
    url, address = argv
    from raydist_loader import load_across_cluster

    with load_across_cluster(MODEL, url, tp=TP, device="auto", ray_address=address, progress=False) as loaded:
        report = loaded.report
    print(json.dumps({
        "bytes": report.total.bytes,
        "seconds": report.total.call_to_verified_s,
        "time_to_ready_s": report.total.time_to_ready_s,
        "phases": {p.name: [p.start_s, p.end_s] for p in report.phases},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
