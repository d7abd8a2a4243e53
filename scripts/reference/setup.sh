#!/usr/bin/env bash
# Sets up the reference implementations mycel is checked and measured
# against, in a venv (default target/refenv, or $MYCEL_REFENV):
# sentence-transformers on Debian's CPU torch, llama.cpp through
# llama-cpp-python (built from source: a few minutes), ONNX Runtime.
#   bash scripts/reference/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

venv="${MYCEL_REFENV:-$PWD/target/refenv}"
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  step "installing Debian's python3-torch (CPU) and python3-venv"
  have apt-get || die "needs Debian's python3-torch (apt-get install python3-torch python3-venv)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q python3-torch python3-venv cmake >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
step "installing the pinned reference packages"
"$venv/bin/pip" install -q -r scripts/reference/requirements.txt
echo "$venv"
