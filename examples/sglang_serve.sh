#!/usr/bin/env bash
# Serve a model with SGLang straight from a raydist_loader store:
# `python -m sglang.launch_server --model-path DIR --load-format raydist`.
#
#   bash examples/sglang_serve.sh            # after `bash scripts/setup.sh` (it makes .venv-sglang)
#
# Runs as written on a CPU-only machine: writes a tiny Llama (transformers), publishes it to a local file store,
# pulls its config/tokenizer files and raydist.json (never weights) into the directory SGLang is started on, serves
# it at tensor-parallel size 2 (each worker pulls and verifies only its own shard), asks for a completion, publishes
# new weights and updates the running server from the store (POST /update_weights_from_disk), and stops.
# On GPUs drop the SGLANG_* CPU variables and CPU flags, and use your own store URL (redis://..., s3://...) and model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-sglang}
PORT=${PORT:-8766}
RAYDIST_LOADER=("$VENV/bin/python" -m raydist_loader)   # = `raydist-loader` in that venv
WORK=$(mktemp -d)
trap 'kill "${SERVER:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

# 1. A checkpoint and a store (any store URL works the same: redis://host:6379/0, s3://bucket/prefix).
tiny() {
  "$VENV/bin/python" -c "
from raydist_loader.testing.tiny_models import make_tiny_checkpoint
make_tiny_checkpoint('llama', '$1', seed=$2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256)
"
}
tiny "$WORK/ckpt" 0
STORE="file://$WORK/store"
"${RAYDIST_LOADER[@]}" publish "$WORK/ckpt" "$STORE" --model tiny-llama --max-tp 4

# 2. The directory SGLang starts on: config, tokenizer, raydist.json (the store URL without secrets, the model).
"${RAYDIST_LOADER[@]}" pull-files "$STORE" --model tiny-llama "$WORK/tiny-llama"
cat "$WORK/tiny-llama/raydist.json"

# 3. Serve. Each TP worker pulls only its shard from the store, verifies it, then SGLang loads it. The store comes
#    from --model-loader-extra-config (the same keys as vLLM's); without it, from DIR/raydist.json.
export SGLANG_USE_CPU_ENGINE=1 SGLANG_CPU_OMP_THREADS_BIND="0|1"   # CPU only: one core per worker
(cd "$WORK" && exec "$OLDPWD/$VENV/bin/python" -m sglang.launch_server --model-path "$WORK/tiny-llama" \
  --load-format raydist --model-loader-extra-config "{\"url\": \"$STORE\", \"model\": \"tiny-llama\"}" --tp 2 \
  --port "$PORT" --served-model-name tiny-llama --skip-server-warmup \
  --device cpu --attention-backend torch_native --disable-cuda-graph --dtype float32 \
  --mem-fraction-static 0.05 --max-total-tokens 2048) > "$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -40 "$WORK/server.log"; echo "sglang.launch_server exited" >&2; exit 1; }
  sleep 1
done
grep -h "raydist: rank" "$WORK/server.log" | sed 's/^.*raydist: /raydist: /'

# 4. A request (random weights: the text is noise; the point is that it is served).
complete() {
  curl -sf "http://127.0.0.1:$PORT/generate" -H 'Content-Type: application/json' \
    -d '{"input_ids": [1, 5, 7, 9], "sampling_params": {"max_new_tokens": 5, "temperature": 0}}'
  echo
}
complete

# 5. RL weight update: publish new weights as the model's next version, then every worker pulls and verifies its
#    shard of the store's current version before the first weight changes (a bad byte leaves the old weights).
tiny "$WORK/ckpt2" 1
"${RAYDIST_LOADER[@]}" publish "$WORK/ckpt2" "$STORE" --model tiny-llama --max-tp 4
curl -sf "http://127.0.0.1:$PORT/update_weights_from_disk" -H 'Content-Type: application/json' \
  -d "{\"model_path\": \"$WORK/tiny-llama\", \"load_format\": \"raydist\"}"
echo
complete
