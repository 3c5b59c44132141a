#!/usr/bin/env bash
# Two TPU VMs: the router, in front of the prefill and decode workers (it runs on any host; it
# needs the model directory for the tokenizer and config, not the weights' devices).
# The prefill worker dials DECODE_ADDR itself to send the KV cache, so use addresses that the
# prefill VM can reach (internal IPs), not localhost.
#   PREFILL_ADDR=10.0.0.2:50061 DECODE_ADDR=10.0.0.3:50062 INTERNAL_TOKEN_FILE=token scripts/tpu_vm/router_host.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
# shellcheck disable=SC2086
exec $SPLITSERVE router --model "$MODEL" --prefill "${PREFILL_ADDR:?PREFILL_ADDR=host:port of the prefill worker(s)}" \
  --decode "${DECODE_ADDR:?DECODE_ADDR=host:port of the decode worker(s)}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-50051}" "${TLS_FLAGS[@]}" "${TOKEN_FLAGS[@]}" "$@"
