#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv (or conda with INIT_USE_CONDA=1), pinned packages,
# the right torch build. Usage: ./init.sh [--dev] [--deepspeed] [--gguf]   (--dev adds the test tools;
# --deepspeed the optional DeepSpeed ZeRO-3 support; --gguf llama-cpp-python and llama.cpp's HF -> GGUF
# converter for the GGUF export and backend). Each part is skipped when its stamp says it is up to date.
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
DEEPSPEED=0
GGUF=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --deepspeed) DEEPSPEED=1 ;;
    --gguf) GGUF=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "error: unknown option $arg (use --dev, --deepspeed, --gguf)" >&2; exit 2 ;;
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
# Stamps: the core (requirements, pyproject, this script, torch build; dev or not) and one per extra
# (its requirements file): a part whose stamp is there is not installed again.
stamp_of() { echo ".venv/.pokemon-gemma-$1-$(cat "${@:2}" | sha256sum | cut -c1-16)-$TORCH_KIND"; }
CORE=$(stamp_of core requirements.txt requirements-dev.txt pyproject.toml init.sh)
DS_STAMP=$(stamp_of deepspeed requirements-deepspeed.txt)
GGUF_STAMP=$(stamp_of gguf requirements-gguf.txt pokemon_gemma/export/llama_cpp.py)
if [ -f "$CORE-dev1" ] || { [ "$DEV" = 0 ] && [ -f "$CORE-dev0" ]; }; then
  say "core environment up to date"
  CORE_DONE=1
else
  CORE_DONE=0
fi

if [ "$CORE_DONE" = 0 ]; then
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

  rm -f .venv/.pokemon-gemma-core-*
  touch "$CORE-dev$DEV"
fi

if [ "$DEEPSPEED" = 1 ] && [ ! -f "$DS_STAMP" ]; then
  say "installing DeepSpeed (requirements-deepspeed.txt) and building its CPU communication op"
  pip_install -r requirements-deepspeed.txt
  # On CPU, DeepSpeed JIT-compiles a small C++ op at its first start (kept in .venv/torch_extensions):
  # build it now, so that the first training run does not pay for it.
  if [ "$TORCH_KIND" = cpu ]; then
    "$PY" -c "from pokemon_gemma.distributed import use_own_extensions_dir as d; d()
from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
      || say "warning: DeepSpeed's CPU op did not build now (a C++ compiler is needed); it will be tried at first use"
  fi
  touch "$DS_STAMP"
fi

if [ "$GGUF" = 1 ] && [ ! -f "$GGUF_STAMP" ]; then
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
  touch "$GGUF_STAMP"
fi

"$PY" -c "import torch, transformers, peft, accelerate; print(f'[init] torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"
[ -f .env ] || { cp .env.example .env; say "created .env from .env.example"; }
say "done: activate with 'source .venv/bin/activate'"
