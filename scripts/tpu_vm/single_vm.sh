#!/usr/bin/env bash
# One TPU VM: the router and a prefill worker and a decode worker on disjoint chips of this host
# (by default 4 + 4 chips of a v5e-8). `splitserve launch --platform tpu` hands each worker its
# chips (TPU_VISIBLE_CHIPS, TPU_CHIPS_PER_PROCESS_BOUNDS) and its own libtpu port.
# MODE=colocated: the baseline, workers running both phases (DECODE_TP chips each).
#   PREFILL_TP=4 DECODE_TP=4 PORT=50051 HOST=127.0.0.1 scripts/tpu_vm/single_vm.sh [launch flags]
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODE_FLAGS=(--mode "${MODE:-disaggregated}")
if [[ "${MODE:-disaggregated}" == disaggregated ]]; then
  MODE_FLAGS+=(--prefill-mesh "tp=${PREFILL_TP:-4}")
fi
# shellcheck disable=SC2086  # SPLITSERVE may be a command with arguments
exec $SPLITSERVE launch --model "$MODEL" --platform "$PLATFORM" \
  "${MODE_FLAGS[@]}" --decode-mesh "tp=${DECODE_TP:-4}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-50051}" "${TLS_FLAGS[@]}" "$@"
