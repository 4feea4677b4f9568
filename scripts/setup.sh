#!/usr/bin/env bash
# Create .venv and install be-bench with everything it needs, from nothing. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel lies on these machines' disk; an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine, install the torch build for your CUDA first; this line then changes nothing.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Only CLIP's BPE vocabulary file is used from open_clip_torch (SD v1-4's tokenizer, offline); its own
# dependencies (torchvision, timm) are not needed, and PyPI's torchvision breaks beside the CPU torch.
python -m pip install -q --no-deps "open_clip_torch==3.3.0"
