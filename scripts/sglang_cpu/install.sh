#!/usr/bin/env bash
# SGLang 0.5.23 on a CPU-only machine (no CUDA), for the engine tests (tests/test_sglang.py) and
# benchmarks/sglang_load.py: sglang without its CUDA dependency set, the pure-Python deps its imports need (versions
# from lock.txt), torchvision's two unguarded fake registrations guarded, a stand-in sgl_kernel (the CPU kernel
# build is not on the registry: SGLang then takes its torch-native paths), and this package with its redis/s3
# extras (so the `sglang.srt.plugins` entry point exists). The torchvision guard and the stand-in are test
# scaffolding: they live in this venv only, never in the package. Idempotent: a venv that imports sglang keeps it.
# usage: scripts/sglang_cpu/install.sh VENV_DIR. Runtime: SGLANG_USE_CPU_ENGINE=1 (and
# SGLANG_CPU_OMP_THREADS_BIND="0|1" at tp=2).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
V=$1
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | grep -v "is ignored" || true; }
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
echo "torch==2.13.0" > "$V/constraints.txt"
if ! SGLANG_USE_CPU_ENGINE=1 "$V/bin/python" -c "import sglang.srt.model_loader.loader" >/dev/null 2>&1; then
  quiet "$V/bin/pip" install -q torch==2.13.0  # the CPU build on disk, FIRST: sglang's wheel pins a CUDA build
  quiet "$V/bin/pip" install -q --no-deps sglang==0.5.23
  quiet "$V/bin/pip" install -q -c "$V/constraints.txt" -c "$HERE/lock.txt" \
    numpy transformers tokenizers safetensors psutil requests tqdm packaging pydantic pyzmq msgspec orjson pybase64 \
    setproctitle einops pillow regex triton fastapi uvicorn uvloop python-multipart prometheus-client aiohttp xxhash \
    zstandard scipy sentencepiece tiktoken interegular partial_json_parser python-dateutil distro easydict openai \
    watchfiles IPython dill apache-tvm-ffi compressed-tensors gguf xgrammar jsonschema soundfile redis hiredis boto3
  quiet "$V/bin/pip" install -q -c "$V/constraints.txt" --no-deps torchvision==0.28.0
  SP=$("$V/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # torchvision's _C.so cannot load on CPU torch; its two unguarded fake registrations then fail at import
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SP/torchvision/_meta_registrations.py"
  mkdir -p "$SP/sgl_kernel"
  cp "$HERE/sgl_kernel_stub.py" "$SP/sgl_kernel/__init__.py"
fi
# the editable install writes the package's metadata into the checkout: one at a time (scripts/setup.sh's lock)
LOCKED=(); [ -z "${RAYDIST_SETUP_LOCK:-}" ] || LOCKED=(flock "$RAYDIST_SETUP_LOCK")
quiet "${LOCKED[@]}" "$V/bin/pip" install -q -c "$V/constraints.txt" -c "$HERE/lock.txt" -e "$ROOT[redis,s3]"
SGLANG_USE_CPU_ENGINE=1 "$V/bin/python" -c "import importlib.metadata as m, sglang, sglang.srt.model_loader.loader; \
print('sglang venv ok: sglang', sglang.__version__, 'raydist plugin', \
[e.value for e in m.entry_points(group='sglang.srt.plugins') if e.name == 'raydist'])"
