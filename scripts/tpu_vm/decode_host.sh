#!/usr/bin/env bash
# Two TPU VMs: the decode worker, on every chip of this VM (TP = the chips' device count).
# It listens on HOST:PORT for the router (and gRPC KV transfers), and on HOST:KV_DATA_PORT for the
# prefill worker's KV data socket (a fixed port, so a firewall rule can let the prefill VM in).
# KV_TRANSPORT=grpc: no KV data socket; the KV comes through PORT (one port to open, slower).
#   TP=8 HOST=0.0.0.0 PORT=50062 KV_DATA_PORT=50063 INTERNAL_TOKEN_FILE=token TLS_CERT=... scripts/tpu_vm/decode_host.sh [flags]
set -euo pipefail
source "$(dirname "$0")/common.sh"
KV_FLAGS=(--kv-transport "${KV_TRANSPORT:-socket}")
if [[ "${KV_TRANSPORT:-socket}" == socket ]]; then
  KV_FLAGS+=(--kv-data-port "${KV_DATA_PORT:-50063}")
fi
# shellcheck disable=SC2086
exec $SPLITSERVE decode-worker --model "$MODEL" --platform "$PLATFORM" --mesh "tp=${TP:-8}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-50062}" "${KV_FLAGS[@]}" \
  "${TLS_FLAGS[@]}" "${TOKEN_FLAGS[@]}" "$@"
