#!/usr/bin/env bash
# Quick start: set up a virtual environment, build three tiny demo checkpoints, TIES-merge them
# with examples/ties.mrg and load the result with transformers. Runs from any directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv
fi

echo "==> installing torch and mergelang (editable, with test extras)"
# torch 2.13.0, CPU build: on this project's machines pip finds the CPU wheel in its local wheel
# folder (find-links), so pinning the exact version avoids a multi-GB CUDA download from PyPI.
# Install torch *before* mergelang so its `torch>=2.1` requirement is already satisfied.
# (For a GPU box, install the CUDA build of torch you want instead.)
.venv/bin/python -m pip install "torch==2.13.0"
.venv/bin/python -m pip install -e ".[test]"

echo "==> compiling the fused CPU loops of the common methods (once; a first merge then runs warm)"
.venv/bin/mergelang warmup -q

echo "==> building tiny models in examples/models"
.venv/bin/python examples/make_tiny_models.py --out examples/models

echo "==> merging: examples/ties.mrg -> examples/merged-ties"
.venv/bin/mergelang run examples/ties.mrg -o examples/merged-ties --force

echo "==> loading the merged model"
.venv/bin/python - <<'PY'
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("examples/merged-ties")
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
print("merged model loads; logits shape:", tuple(logits.shape))
PY
echo "==> done. Run the tests with: .venv/bin/python -m pytest -n 2 -q"
