#!/usr/bin/env bash
# CI: what tests/test_app.py needs, installed into the already-active venv: the demo's optional dependencies and a
# system Chromium for the browser test (Playwright drives it; its own browser download is not used).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -r requirements-app.txt
if ! command -v chromium >/dev/null; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
