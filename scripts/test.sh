#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, then pytest (real redis-server and moto S3 on loopback, local Ray).
# Two pytest workers, a module each at a time (--dist loadfile: a module's servers, Ray session and engines stay in
# one process); the engine modules first, as they are the longest (tests/conftest.py orders them; xdist keeps that
# order with --no-loadscope-reorder). Arguments replace the test selection: `bash scripts/test.sh tests/test_store.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all   # everything the suite needs: .venv, .venv-vllm, .venv-sglang, redis-server, npm
export RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check raydist_loader tests examples benchmarks
if [ "$#" -eq 0 ]; then
  set -- tests
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 -n 2 --dist loadfile --no-loadscope-reorder "$@"
