#!/usr/bin/env bash
# Install kbitc with its test dependencies and run the whole test suite.
# torch is installed only when missing: torch==2.13.0 resolves to the local CPU wheel here; a
# machine that already has torch (e.g. a CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0
python3 -m pip install ".[test]"
python3 -m pytest -q tests
