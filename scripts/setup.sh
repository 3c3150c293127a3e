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
# The package with its test tools, the evaluation extra, the Hugging Face extra (transformers, so the
# HF CLIP/SigLIP tests run instead of skipping) and the optional robustbench extra (robustbench 1.1.1's
# import-time dependencies, with our pins), then robustbench itself WITHOUT its own pins (it
# pins timm==1.0.9, which open_clip's timm>=1.0.17 excludes), so its integration test runs.
# Its imports of pkg_resources (setuptools >= 81 has none) and of `autoattack` (installed as
# `pyautoattack`) are bridged at import time by atpt_plugin.adapters.robustbench.import_robustbench().
python -m pip install -q -c constraints.txt -e ".[dev,eval,hf,robustbench]"
python -m pip install -q -c constraints.txt --no-deps robustbench
