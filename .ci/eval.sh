#!/usr/bin/env bash
# Optional test dependencies, installed into the active venv before the test command (called from .ci/run):
# lmms-eval and the Dimple plugin (tests/test_lmms_eval_plugin.py), torchao (tests/test_quantization.py).
# The multi-process fine-tuning tests need nothing beyond requirements-dev.txt (torchrun ships with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0 -r requirements-eval.txt
# The only torchvision for torch 2.13 on the index is a CUDA build; on this CPU torch it breaks
# `import torchvision` and, through transformers, AutoProcessor. Nothing here needs it.
pip uninstall -q -y torchvision
