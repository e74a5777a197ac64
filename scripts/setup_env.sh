#!/usr/bin/env bash
# Creates (or completes) the project virtualenv. Idempotent: each step is skipped when already done,
# so `make test` / `make demo` can call it every time. Only a fresh machine pays the mmcv build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${VENV:-.venv}")
PY=${PYTHON:-python3}
WHEEL_CACHE=${MEDVLP_WHEEL_CACHE:-$HOME/.cache/medvlp-bench/wheels}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
MMCV_VERSION=2.1.0

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  log "installing $TORCH_PIN (about a minute)"
  pipi $TORCH_PIN
fi

# The project and its pinned dependencies (pyproject.toml). Re-run only when pyproject changes.
stamp="$VENV/.medvlp-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing medvlp-bench and its pinned dependencies"
  pipi "setuptools<82" wheel ninja
  pipi -e ".[dev]"
  rm -f "$VENV"/.medvlp-deps-* && touch "$stamp"
fi

# The torchxrayvision wheel ships the publishers' real label files (no images): the test suite
# checks our loaders against them. Installed without its dependencies; only its data/ is read.
if ! "$VPY" -c "import importlib.util as u; assert u.find_spec('torchxrayvision')" 2>/dev/null; then
  log "installing torchxrayvision 1.5.7 (real label files for the loader smoke tests)"
  pipi --no-deps "torchxrayvision==1.5.7"
fi

# mmcv 2.1.0 has no wheel for torch 2.14: build it from the sdist with two fixes
# (setuptools<82 for pkg_resources, C++20 for torch 2.14 headers) and cache the wheel.
# Where torch sees a GPU the ops are compiled for CUDA too (FORCE_CUDA=1). The cached wheel's tag
# ends in -cpu or -cuda<version>, so a CPU-only wheel is never installed on a CUDA machine, and a
# CPU-only mmcv already in the venv there is replaced, with a notice.
ops_kind=$("$VPY" -c 'import torch; print(f"cuda{torch.version.cuda}" if torch.cuda.is_available() else "cpu")')
mmcv_has() {   # exit 0 when the installed mmcv imports with compiled ops of the kind wanted ($1)
  "$VPY" - "$1" <<'PY' 2>/dev/null
import sys
import mmcv, mmcv.ops
from mmcv.ops import get_compiling_cuda_version
sys.exit(0 if sys.argv[1] == "cpu" or get_compiling_cuda_version() != "not available" else 3)
PY
}
if ! mmcv_has "$ops_kind"; then
  if [ "$ops_kind" != cpu ] && "$VPY" -c "import mmcv.ops" 2>/dev/null; then
    log "NOTICE: the installed mmcv has no CUDA ops but this machine has CUDA ($ops_kind): installing a CUDA build"
  fi
  py_tag=$("$VPY" -c 'import sys;print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  tag="mmcv-$MMCV_VERSION-torch2.14.1-$py_tag-$ops_kind"
  cache="$WHEEL_CACHE/$tag"
  legacy="$WHEEL_CACHE/mmcv-$MMCV_VERSION-torch2.14.1-$py_tag"   # untagged: always built with FORCE_CUDA=0
  if [ "$ops_kind" = cpu ] && [ -d "$legacy" ] && ls "$legacy"/mmcv-*.whl >/dev/null 2>&1 \
      && ! ls "$cache"/mmcv-*.whl >/dev/null 2>&1; then
    mv "$legacy" "$cache"
  fi
  if ! ls "$cache"/mmcv-*.whl >/dev/null 2>&1; then
    force_cuda=$([ "$ops_kind" = cpu ] && echo 0 || echo 1)
    log "building mmcv $MMCV_VERSION with compiled ops ($ops_kind) from source (about 11 minutes on 2 cores, once per machine)"
    work=$(mktemp -d)
    "$VPY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
    tar -xzf "$work"/mmcv-*.tar.gz -C "$work"
    src=$(find "$work" -maxdepth 1 -type d -name "mmcv-*" | head -n1)
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$src/setup.py"
    grep -q "c++20" "$src/setup.py" || { log "mmcv setup.py patch did not apply"; exit 1; }
    mkdir -p "$cache"
    (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=$force_cuda MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip wheel \
        --disable-pip-version-check -q --no-deps --no-build-isolation . -w "$cache.partial")
    mv "$cache.partial"/mmcv-*.whl "$cache"/ && rm -rf "$cache.partial" "$work"
  fi
  pipi --force-reinstall --no-deps "$cache"/mmcv-*.whl
  mmcv_has "$ops_kind" || { log "mmcv from $cache lacks $ops_kind ops"; exit 1; }
fi
if ! "$VPY" -c "import mmdet, mmseg" 2>/dev/null; then
  log "installing mmdet and mmsegmentation"
  pipi "mmdet==3.3.0" "mmsegmentation==1.2.2"
fi
log "environment ready: $VENV"
