#!/usr/bin/env bash
# Create .venv and install everything structtoken-d2 needs, from the package registries only.
#   bash tools/setup_env.sh          (what `make setup` runs; no arguments)
# Torch, requirements.txt + requirements-dev.txt, detectron2 (tools/install_detectron2.py), then the
# structtoken_d2._C extension built in place and the project installed editable.
# Idempotent: each step is skipped when what it installs is already in place.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv
py=$VENV/bin/python
say() { echo "[setup] $*"; }

if [ ! -x "$py" ]; then
  base=$(command -v python3.11 || command -v python3)
  say "creating $VENV with $($base --version)"
  "$base" -m venv "$VENV"
  "$py" -m pip install -q --upgrade pip setuptools wheel
fi

if "$py" -c "import torch, torchvision" 2>/dev/null; then
  say "torch $("$py" -c 'import torch; print(torch.__version__)') already installed, kept"
else
  say "installing torch 2.14.1 + torchvision 0.29.1"
  "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi

req_hash=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat $VENV/.requirements.sha256 2>/dev/null)" = "$req_hash" ]; then
  say "requirements unchanged, skipped"
else
  say "installing requirements.txt and requirements-dev.txt"
  "$py" -m pip install -q -r requirements.txt -r requirements-dev.txt
  echo "$req_hash" > $VENV/.requirements.sha256
fi

"$py" tools/install_detectron2.py

# The CUDA toolkit root is the folder whose lib64/ holds libcudart.so (the parent of the nvcc on PATH
# may be a wrapper's folder, so check candidates).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  for root in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    if [ -e "$root/lib64/libcudart.so" ]; then export CUDA_HOME=$root; break; fi
  done
fi
src_hash=$( (cat setup.py; find csrc -type f | sort | xargs -r cat; env | grep -E '^(CUDA_HOME|FORCE_CUDA|TORCH_CUDA_ARCH_LIST|STRUCTTOKEN_D2_NO_EXTENSION)=' | sort) | sha256sum | cut -d' ' -f1)
if [ "$(cat $VENV/.extension.sha256 2>/dev/null)" = "$src_hash" ] && "$py" -c "import structtoken_d2, structtoken_runtime" 2>/dev/null; then
  say "structtoken_d2 and its extension up to date, skipped"
else
  say "building the structtoken_d2._C extension in place (CUDA_HOME=${CUDA_HOME:-none})"
  "$py" setup.py build_ext --inplace
  say "installing structtoken-d2 (editable)"
  STRUCTTOKEN_D2_NO_EXTENSION=1 "$py" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$src_hash" > $VENV/.extension.sha256
fi
"$py" -c "import structtoken_d2.ops as o; print('[setup] ops on cpu:', o.active_implementation('cpu'))"
say "done in $(( $(date +%s) - start )) s"
