#!/usr/bin/env bash
# Set-up: a virtual environment in .venv with everything ColIntern needs (CPU or GPU; same wheels), at the tested
# versions of constraints.txt. torch + torchvision first, as a matching pair (InternVLProcessor needs
# torchvision), then the rest of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -c constraints.txt -r requirements.txt
.venv/bin/python -c "import torch, torchvision, transformers, peft, mteb, faiss; print('ColIntern set-up OK: torch', torch.__version__, '| transformers', transformers.__version__, '| mteb', mteb.__version__)"
