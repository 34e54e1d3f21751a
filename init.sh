#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv (or conda with INIT_USE_CONDA=1), pinned packages,
# the right torch build. Usage: ./init.sh [--dev] [--gguf]   (--dev adds the test tools; --gguf adds
# llama-cpp-python and llama.cpp's HF -> GGUF converter for the GGUF export and backend)
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
GGUF=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --gguf) GGUF=1 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "error: unknown option $arg (use --dev, --gguf)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
say() { printf '[init] %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; install Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "Python 3.11+ is required, found $("$PYTHON" -V 2>&1) ($PYTHON)"

if [ "${INIT_USE_CONDA:-0}" = "1" ]; then
  command -v conda >/dev/null || fail "INIT_USE_CONDA=1 but conda is not on PATH"
  [ -d .venv ] || { say "creating conda env in .venv"; conda create -y -p .venv python=3.11 >/dev/null; }
else
  [ -x .venv/bin/python ] || { say "creating virtual environment .venv"; "$PYTHON" -m venv .venv; }
fi
PY=.venv/bin/python
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" \
  || fail "pip could not install $* (is the package registry reachable? see the pip output above)"; }

OS=$(uname -s)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  TORCH_KIND=cuda
else
  TORCH_KIND=cpu
fi
# One stamp per set of inputs and torch build, recording the extras installed (dev, gguf): a run that
# asks for no more than a stamp records is a no-op, and a new stamp keeps what the old one had.
BASE_STAMP=".venv/.pokemon-gemma-$(cat requirements.txt requirements-dev.txt requirements-gguf.txt pyproject.toml init.sh | sha256sum | cut -c1-16)-$TORCH_KIND"
for old in "$BASE_STAMP"-dev*-gguf*; do
  [ -f "$old" ] || continue
  extras=${old#"$BASE_STAMP"-dev}
  had_dev=${extras%%-gguf*} had_gguf=${extras#*-gguf}
  if [ "$had_dev" -ge "$DEV" ] && [ "$had_gguf" -ge "$GGUF" ]; then
    say "environment up to date ($old)"; exit 0
  fi
  if [ "$had_dev" -gt "$DEV" ]; then DEV=$had_dev; fi
  if [ "$had_gguf" -gt "$GGUF" ]; then GGUF=$had_gguf; fi
done
STAMP="$BASE_STAMP-dev$DEV-gguf$GGUF"

say "checking the package registry"
"$PY" -m pip download --disable-pip-version-check -q --no-deps --dest "$(mktemp -d)" python-dotenv==1.2.4 >/dev/null 2>&1 \
  || fail "cannot reach the Python package registry (pip download failed); check network/proxy settings"

if "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "torch $TORCH_VERSION already installed"
elif [ "$TORCH_KIND" = cuda ]; then
  say "NVIDIA GPU found: installing a CUDA build of torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" \
    --extra-index-url https://pypi.org/simple
else
  # Exactly this pin: a looser one pulls a multi-GB CUDA build. No torchvision on CPU (it breaks transformers).
  say "no NVIDIA GPU: installing the CPU build torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi

say "installing pinned requirements (MLX: mlx[cpu] on Linux, mlx on macOS)"
pip_install -r requirements.txt
if [ "$DEV" = 1 ]; then
  say "installing test tools"
  pip_install -r requirements-dev.txt
fi
say "installing pokemon-gemma in editable mode (console commands pokemon-gemma-*)"
pip_install "setuptools>=68" wheel
pip_install --no-deps --no-build-isolation -e .

if [ "$GGUF" = 1 ]; then
  # PyPI has only the sdist: the first install compiles llama.cpp (~19 CPU-minutes: ~10 min on 2 idle
  # cores). Named requirement: pip's wheel cache makes every later install take seconds (and a wheel
  # folder works too: PIP_FIND_LINKS=DIR). A portable CPU build (x86-64-v3, not -march=native), no OpenSSL.
  say "installing requirements-gguf.txt (llama-cpp-python: compiles llama.cpp unless installed or pip has the wheel cached)"
  started=$SECONDS
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    "$PY" -m pip install --disable-pip-version-check -q -r requirements-gguf.txt \
    || fail "could not install requirements-gguf.txt: PyPI has llama-cpp-python only as an sdist, whose build needs" \
            "a C/C++ compiler (apt-get install build-essential) and the package registry (see the pip output above)"
  say "requirements-gguf.txt installed in $((SECONDS - started)) s"
  say "llama.cpp's HF -> GGUF converter from the same sdist (convert_hf_to_gguf.py, conversion/, gguf-py/)"
  "$PY" -c "from pokemon_gemma.export.llama_cpp import main; raise SystemExit(main(['fetch']))" \
    || fail "could not extract llama.cpp's converter from the llama-cpp-python sdist (see the message above)"
fi

"$PY" -c "import torch, transformers, peft, accelerate; print(f'[init] torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"
rm -f .venv/.pokemon-gemma-*
touch "$STAMP"
[ -f .env ] || { cp .env.example .env; say "created .env from .env.example"; }
say "done: activate with 'source .venv/bin/activate'"
