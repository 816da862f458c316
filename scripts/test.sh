#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, then pytest (real redis-server and moto S3 on loopback, local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all   # everything the suite needs: .venv, .venv-vllm, .venv-sglang, redis-server, npm
export RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check raydist_loader tests examples benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@"
