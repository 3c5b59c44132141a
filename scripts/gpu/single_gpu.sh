#!/usr/bin/env bash
# One GPU machine: the router and a prefill worker and a decode worker sharing the GPU(s).
# With fewer GPUs than the workers need, `splitserve launch --platform gpu` gives every worker
# the same CUDA_VISIBLE_DEVICES and a share of the GPU memory (XLA_PYTHON_CLIENT_MEM_FRACTION
# = 0.9 / workers); with enough GPUs each worker gets its own.
# MODE=colocated: the baseline, one worker running both phases (DECODE_TP sets its mesh).
#   MODEL=~/models/qwen2.5-0.5b-instruct PORT=50051 scripts/gpu/single_gpu.sh [launch flags]
set -euo pipefail
SPLITSERVE=${SPLITSERVE:-splitserve}
MODE_FLAGS=(--mode "${MODE:-disaggregated}")
if [[ "${MODE:-disaggregated}" == disaggregated ]]; then
  MODE_FLAGS+=(--prefill-mesh "tp=${PREFILL_TP:-1}")
fi
# shellcheck disable=SC2086  # SPLITSERVE may be a command with arguments
exec $SPLITSERVE launch --model "${MODEL:-$HOME/models/qwen2.5-0.5b-instruct}" --platform "${PLATFORM:-gpu}" \
  "${MODE_FLAGS[@]}" --decode-mesh "tp=${DECODE_TP:-1}" \
  --kv-cache-gib "${KV_CACHE_GIB:-2}" --host "${HOST:-127.0.0.1}" --port "${PORT:-50051}" "$@"
