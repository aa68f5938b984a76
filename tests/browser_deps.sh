#!/usr/bin/env bash
# What tests/test_dashboard.py needs: Debian's headless Chromium + its driver, and Selenium in the
# project's venv. Idempotent: apt runs only when /usr/bin/chromium (or the driver) is missing,
# pip only when selenium does not import. `make test` calls it; run it by hand the same way:
#     bash tests/browser_deps.sh [PYTHON]      (default: .venv/bin/python)
set -euo pipefail
PY="${1:-.venv/bin/python}"

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "browser_deps: need root or sudo for apt-get" >&2; exit 1; }
        SUDO="sudo"
    fi
    echo "browser_deps: installing chromium and chromium-driver with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

if ! "$PY" -c "import selenium" 2>/dev/null; then
    echo "browser_deps: installing selenium into $PY's environment"
    "$PY" -m pip install -q "selenium>=4.20"
fi
"$PY" -c "import selenium; print('browser_deps: chromium', end=' ')" && /usr/bin/chromium --version 2>/dev/null | head -1
