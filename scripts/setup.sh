#!/usr/bin/env bash
# Set-up: a virtual environment with everything ColIntern needs (CPU or GPU; same wheels), at the tested versions of
# a constraints file. torch + torchvision first, as a matching pair (InternVLProcessor needs torchvision), then the
# rest of requirements.txt.
#   bash scripts/setup.sh                                                   .venv, constraints.txt (the main set)
#   VENV=.venv-min CONSTRAINTS=constraints-min.txt bash scripts/setup.sh    the floor set (`make test-min`)
# FAISS: on a machine with an NVIDIA GPU, the GPU FAISS of torch's CUDA major in place of requirements.txt's faiss-cpu,
# where one installs beside torch; faiss-cpu elsewhere. scripts/faiss_choice.py chooses and prints why;
# FAISS=cpu|gpu|<pip requirement> overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" torch torchvision
FAISS_REQ=$("$VENV/bin/python" scripts/faiss_choice.py --constraints "$CONSTRAINTS")
# Every FAISS build installs the same `faiss` module: another one already in the venv goes first.
OTHER_FAISS=$("$VENV/bin/python" scripts/faiss_choice.py --installed-besides "$FAISS_REQ")
[ -z "$OTHER_FAISS" ] || "$VENV/bin/python" -m pip uninstall -q -y $OTHER_FAISS
if [ "$FAISS_REQ" = faiss-cpu ]; then
    "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -r requirements.txt
else  # requirements.txt less its faiss-cpu line, and the chosen FAISS
    grep -v '^faiss-cpu' requirements.txt |
        "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -r /dev/stdin "$FAISS_REQ"
fi
"$VENV/bin/python" -c "import importlib.metadata, torch, torchvision, transformers, peft, mteb, faiss; print('ColIntern set-up OK ($VENV): torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| mteb', mteb.__version__, '| faiss', faiss.__version__, '(' + ' '.join(importlib.metadata.packages_distributions()['faiss']) + ',', faiss.get_num_gpus(), 'GPUs)')"
