#!/usr/bin/env bash
# Offline batch job over a JSONL file, through a running router (single_vm.sh or router_host.sh).
# Re-running with the same output file resumes where it stopped.
#   ROUTER_ADDR=127.0.0.1:50051 scripts/tpu_vm/batch.sh requests.jsonl results.jsonl [batch flags]
# ROUTER_TLS_CA=ca.crt: the router serves TLS (the API key, if any, comes from $SPLITSERVE_API_KEY).
set -euo pipefail
source "$(dirname "$0")/common.sh"
input=${1:?usage: batch.sh INPUT.jsonl OUTPUT.jsonl [splitserve batch flags]}
output=${2:?usage: batch.sh INPUT.jsonl OUTPUT.jsonl [splitserve batch flags]}
shift 2
tls=()
if [[ -n "${ROUTER_TLS_CA:-}" ]]; then
  tls=(--tls-ca "$ROUTER_TLS_CA")
fi
# shellcheck disable=SC2086
exec $SPLITSERVE batch --input "$input" --output "$output" --address "${ROUTER_ADDR:-127.0.0.1:50051}" \
  "${tls[@]}" "$@"
