#!/usr/bin/env bash
# Two TPU VMs: the decode worker, on every chip of this VM (TP = the chips' device count).
# It listens on HOST:PORT for the router and for the prefill worker's KV transfer.
#   TP=8 HOST=0.0.0.0 PORT=50062 INTERNAL_TOKEN_FILE=token TLS_CERT=... scripts/tpu_vm/decode_host.sh [flags]
set -euo pipefail
source "$(dirname "$0")/common.sh"
# shellcheck disable=SC2086
exec $SPLITSERVE decode-worker --model "$MODEL" --platform "$PLATFORM" --mesh "tp=${TP:-8}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-50062}" "${TLS_FLAGS[@]}" "${TOKEN_FLAGS[@]}" "$@"
