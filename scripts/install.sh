#!/usr/bin/env bash
# Installs fastround from this checkout on a fresh machine: system headers, the pinned CPU torch,
# then the package built against that torch (no build isolation, which would fetch another torch).
#   scripts/install.sh          runtime + Hugging Face extras
#   scripts/install.sh --test   also the test dependencies (pytest, auto-round==0.16.1 as the oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
if [ ! -f /usr/include/nlohmann/json.hpp ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nlohmann-json3-dev >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.25" ninja
extras="hf"
[ "${1:-}" = "--test" ] && extras="test"
$PY -m pip install -q --no-build-isolation ".[${extras}]"
$PY -c "import fastround; print('fastround', fastround.__version__, 'installed')"
