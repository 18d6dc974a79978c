#!/usr/bin/env bash
# Every GPU-only check and benchmark, by phase, for a CUDA machine (H100 here). Results that must
# come back are written to $OUT (default ./gpu-out).
#
#   bash scripts/gpu_suite.sh setup     # install kbitc (+ a bitsandbytes wheel from .whl/ if present)
#   bash scripts/gpu_suite.sh tests     # CUDA kernels, backward ops, 8-bit optimizer steps
#   bash scripts/gpu_suite.sh optim     # bench/gpu_optim.py (AdamW8bit on 200M params)
#   bash scripts/gpu_suite.sh qlora     # bench/gpu_qlora.py (1B LLaMA-style QLoRA tokens/s)
#   bash scripts/gpu_suite.sh decode    # bench/gpu_decode.py (1B LLaMA-style batch-1 decode, KV cache + CUDA graph)
#   bash scripts/gpu_suite.sh tune      # bench/tune_gemv.py (the GEMV warps-per-block table)
#   bash scripts/gpu_suite.sh ops       # bench/gpu_ops.py (every op vs cuBLAS bf16 and bitsandbytes)
#   bash scripts/gpu_suite.sh gemma ARTIFACT WINDOWS EXPECTED_PPL TEXT
#                                       # an sm90 artifact compiled elsewhere: perplexity, then finetune
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
phase=${1:?phase}
shift
case "$phase" in
  setup)
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    python3 -m pip install -q --no-deps --no-build-isolation --no-index . ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_grad_cuda.py tests/runtime/test_optim_cuda.py \
      tests/runtime/test_kernels_cuda.py tests/runtime/test_decode.py 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
  optim)
    python3 bench/gpu_optim.py 2>&1 | tee "$OUT/optim.log"
    cp bench/RESULTS.md "$OUT/RESULTS-optim.md" ;;
  decode)
    python3 bench/gpu_decode.py --out-copy "$OUT/decode.md" 2>&1 | tee "$OUT/decode.log" | tail -30 ;;
  tune)
    python3 bench/tune_gemv.py --out-copy "$OUT/tune.md" 2>&1 | tail -40 ;;
  ops)
    python3 bench/gpu_ops.py 2>&1 | tee "$OUT/ops.log" | tail -60
    cp bench/RESULTS.md "$OUT/RESULTS-ops.md" ;;
  qlora)
    python3 bench/gpu_qlora.py --out-copy "$OUT/qlora.md" 2>&1 | tee "$OUT/qlora.log" | tail -40 ;;
  gemma)
    artifact=${1:?artifact} windows=${2:?windows} expect=${3:?expected perplexity} text=${4:?text}
    python3 bench/artifact_perplexity.py "$artifact" --windows "$windows" --device cuda --expect "$expect" \
      2>&1 | tee "$OUT/gemma_ppl.log"
    python3 -m kbitc.cli finetune "$artifact" --data "$text" --out /tmp/gemma-adapters --device cuda \
      --steps 100 --seq-len 256 --batch-size 8 --lr 1e-3 --r 16 2>&1 | tr '\r' '\n' | tail -5 | tee "$OUT/gemma_ft.log"
    cp /tmp/gemma-adapters/finetune_report.json "$OUT/gemma_ft_report.json" ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
