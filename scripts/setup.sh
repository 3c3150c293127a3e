#!/usr/bin/env bash
# Creates .venv with the pinned development versions and installs the package in it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt torch torchvision
python -m pip install -q -c constraints.txt -e ".[dev]"
