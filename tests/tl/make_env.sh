#!/usr/bin/env bash
# Build the TransformerLens 3.9 reference environment that the differential tests in
# tests/tl/ run against. Usage (from anywhere):
#
#     bash tests/tl/make_env.sh [VENV_DIR]        # default: <repo>/.venv-tl
#
# The tests find it at <repo>/.venv-tl, or wherever MECHSCOPE_TL_PYTHON points (a python
# executable). torch is installed first, pinned to the CPU build, so that resolving
# TransformerLens does not pull a CUDA build; TransformerLens 3.9 needs transformers >= 5.9.
# Idempotent: a finished environment (marker file present) is left as it is.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-tl}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
TL_PIN="${TL_PIN:-transformer-lens==3.9.0}"
MARKER="$VENV/.tl-installed"

if [ -f "$MARKER" ] && "$VENV/bin/python" -c "import transformer_lens" 2>/dev/null; then
  echo "TransformerLens environment ready: $VENV ($(cat "$MARKER"))"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH_PIN"
"${PIP[@]}" "$TL_PIN" safetensors
"$VENV/bin/python" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('transformer-lens', 'torch', 'transformers')), sep=', ')"
echo "$TORCH_PIN $TL_PIN" > "$MARKER"
echo "built $VENV in $(( $(date +%s) - start )) s"
