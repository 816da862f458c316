#!/usr/bin/env bash
# The main job on the embedded default: generate a small model, publish it to a local file store, inspect and verify
# it, load it at tp=2 across 2 Ray actors, print the per-rank report and the TP forward check.
# It sets up only what it uses: `scripts/setup.sh core` (.venv; no engine venvs, no redis-server: the store is a
# directory). Each set-up step prints a line, and one every 10 s while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[demo] set-up: bash scripts/setup.sh core (on a fresh machine a few minutes: torch, Ray, transformers)"
bash scripts/setup.sh core
export RAY_USAGE_STATS_ENABLED=0
# Other packages' chatter, silenced by name at its source (errors are always printed):
# - Ray logs a WARNING that it turned token auth on for the new local cluster when RAY_AUTH_MODE is unset: set the
#   mode Ray picks anyway (token), and it says nothing.
# - transformers' "Loading weights" progress bar (the demo's unsharded reference model) and its advisory warnings.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
echo "[demo] bash scripts/setup.sh core: done; running examples/demo.py"
exec .venv/bin/python examples/demo.py "$@"
