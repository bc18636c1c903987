#!/usr/bin/env bash
# Set-up: a virtual environment with everything ColIntern needs (CPU or GPU; same wheels), at the tested versions of
# a constraints file. torch + torchvision first, as a matching pair (InternVLProcessor needs torchvision), then the
# rest of requirements.txt.
#   bash scripts/setup.sh                                                   .venv, constraints.txt (the main set)
#   VENV=.venv-min CONSTRAINTS=constraints-min.txt bash scripts/setup.sh    the floor set (`make test-min`)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" torch torchvision
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -r requirements.txt
"$VENV/bin/python" -c "import torch, torchvision, transformers, peft, mteb, faiss; print('ColIntern set-up OK ($VENV): torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| mteb', mteb.__version__)"
