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
# That is all: CLIP's BPE vocabulary ships inside be-bench. The CLIP score (similarity.clip_weights) also needs
# open_clip_torch and a torchvision matching your torch: `pip install -e ".[clip]"` on such a machine.
