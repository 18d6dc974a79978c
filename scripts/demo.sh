#!/usr/bin/env bash
# Install kbitc, compile the bundled example model (a tiny LLaMA trained on the KJV Bible) to NF4
# for this CPU, load the artifact and generate text with it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0
python3 -m pip install ".[examples]"
out="${TMPDIR:-/tmp}/kbitc-demo/tiny-llama-kjv-nf4.kbit"
kbitc compile examples/tiny-llama-kjv --target cpu --nf4 -o "$out" --force
kbitc inspect "$out"
kbitc generate "$out" --prompt "In the beginning God" --max-new-tokens 40
