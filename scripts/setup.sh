#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh Debian 12 / Python 3.11 machine:
#   .venv         main environment (gateway, Feast, training; numpy 2, torch CPU)
#   .venv-triton  the local Triton server's environment (nvidia-pytriton, numpy<2, onnxruntime)
#   redis-server  from Debian when missing (Redis-backed tests start their own instance)
# Re-running is cheap: each venv is rebuilt only when its pins change (stamp files).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

pip_quiet() { "$@" 2>&1 | grep -vE "is ignored: it is neither a file nor a directory" || true; return "${PIPESTATUS[0]}"; }

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- main venv -------------------------------------------------------------------------------
main_stamp=$(stamp_of pyproject.toml requirements/main.lock)
if [ ! -f .venv/.stamp ] || [ "$(cat .venv/.stamp)" != "$main_stamp" ]; then
  echo "setup: creating .venv (main environment)"
  rm -rf .venv
  "$PY" -m venv .venv
  pip_quiet .venv/bin/pip install -q --upgrade "pip==26.3"
  # torch first, from the CPU wheel on disk: anything resolving `torch` later sees it satisfied
  # instead of pulling a multi-GB CUDA build.
  pip_quiet .venv/bin/pip install -q "torch==2.13.0"
  # setuptools' editable build prints a boxed BuildBackendWarning ("be careful with folders ... with
  # the same name as your package") on every install: advice for packagers, noise for a newcomer.
  PYTHONWARNINGS=ignore::UserWarning pip_quiet .venv/bin/pip install -q -c requirements/main.lock -e ".[dev]"
  .venv/bin/python -c 'import torch, feast, numpy; assert not torch.cuda.is_available() or True; assert numpy.__version__.startswith("2")'
  echo "$main_stamp" > .venv/.stamp
fi

# --- Triton venv -----------------------------------------------------------------------------
triton_stamp=$(stamp_of requirements/triton.txt requirements/triton.lock)
if [ ! -f .venv-triton/.stamp ] || [ "$(cat .venv-triton/.stamp)" != "$triton_stamp" ]; then
  echo "setup: creating .venv-triton (local Triton server environment)"
  rm -rf .venv-triton
  "$PY" -m venv .venv-triton
  pip_quiet .venv-triton/bin/pip install -q --upgrade "pip==26.3"
  pip_quiet .venv-triton/bin/pip install -q -c requirements/triton.lock -r requirements/triton.txt
  .venv-triton/bin/python -c 'import numpy, onnxruntime, tokenizers, pytriton; assert numpy.__version__.startswith("1.")'
  echo "$triton_stamp" > .venv-triton/.stamp
fi

# --- redis-server ------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null; then
  echo "setup: installing redis-server from Debian"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "setup: ready ($ROOT/.venv, $ROOT/.venv-triton, $(redis-server --version | cut -d' ' -f3))"
