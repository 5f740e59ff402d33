#!/usr/bin/env bash
# Create (or update) ./.venv for CPU work: tests, the Quickstart, benchmarks. Idempotent and offline-friendly.
# The CPU torch goes in first and is pinned in the same command as everything else, so that no requirement can
# pull a CUDA build of torch next to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" -r requirements.txt -r requirements-dev.txt -c tools/constraints.txt
echo "venv ready: $(.venv/bin/python -c 'import torch, diffusers, transformers, accelerate, webdataset as w; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, webdataset {w.__version__}")')"
