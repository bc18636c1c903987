#!/usr/bin/env bash
# `make pins`: re-resolve the tested set. Installs requirements.txt's ranges (newest releases that fit) into a
# throwaway venv, with no constraints, and writes its `pip freeze` into constraints.txt under the header. Then run
# `make test` (it reinstalls .venv from the new pins) and commit constraints.txt only if it is green.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$tmp/venv/bin/python" -m pip install -q -r requirements.txt
{ grep '^#' constraints.txt; "$tmp/venv/bin/python" -m pip freeze --exclude-editable; } > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
rm -f .venv/.setup-done  # the next make test / make demo reinstalls from the new pins
git --no-pager diff --stat -- constraints.txt || true
echo "constraints.txt refreshed: run 'make test', then commit it if the suite is green"
