#!/usr/bin/env bash
# Every GPU figure of the project in one run, with plain torch (no Ray, no Optuna needed):
#   - step only, iresnet50 at 112 px: fp32 / bf16 / bf16+channels_last / +torch.compile at
#     batch 128; batch 128 / 256 / 512; 100k / 1M / 2M identities with the full softmax;
#     Partial FC (sample_rate 0.1) at 1M and 2M identities; a virface step;
#   - the training loop (virface-train's run_stage) against its step at batch 256, bf16.
# About 5 minutes on one H100 or H200; figures go to stdout and to $OUT_DIR (default ./gpu_suite).
#
#   bash benchmarks/gpu_suite.sh               # on a CUDA machine
#   bash benchmarks/gpu_suite.sh --cpu-smoke   # tiny shapes on CPU: checks the script runs (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_suite}
SMOKE=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=(--cpu-smoke); fi
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"
echo "== step only"
"$PYTHON" benchmarks/gpu_throughput.py --suite "${SMOKE[@]}" --out "$OUT_DIR/steps.json"
echo "== the loop against its step"
"$PYTHON" benchmarks/gpu_loop.py "${SMOKE[@]}" --out "$OUT_DIR/loop.json"
echo "== figures in $OUT_DIR"
