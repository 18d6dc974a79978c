#!/usr/bin/env bash
# Install kbitc and run the main job on the bundled example: a per-layer NF4 quantization report.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0
python3 -m pip install .
kbitc report examples/tiny_llama_linears.safetensors
