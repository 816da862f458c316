#!/usr/bin/env bash
# The main job on the embedded default: generate a small model, publish it to a local file store, inspect and verify
# it, load it at tp=2 across 2 Ray actors, print the per-rank report and the TP forward check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python examples/demo.py "$@"
