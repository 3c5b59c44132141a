# Settings shared by the scripts in this folder, each from the environment with a default.
# Sourced, not run. Any flag given to a script is passed on to splitserve after these, and
# argparse keeps the last value, so `--port 6000` on the command line beats PORT.

SPLITSERVE=${SPLITSERVE:-splitserve}  # the command (e.g. "python -m splitserve.runtime.cli")
MODEL=${MODEL:-$HOME/models/qwen2.5-0.5b-instruct}  # an HF directory, an Orbax checkpoint, or demo
PLATFORM=${PLATFORM:-tpu}  # cpu to try a script on any machine

# TLS_CERT + TLS_KEY + TLS_CA: mutual TLS between router and workers (the certificate names every
# address that is dialled). ALLOW_INSECURE=1: plaintext off loopback, for a private network only.
# INTERNAL_TOKEN_FILE: the token the router and workers share (launch makes its own).
TLS_FLAGS=()
if [[ -n "${TLS_CERT:-}" ]]; then
  TLS_FLAGS=(--tls-cert "$TLS_CERT" --tls-key "${TLS_KEY:?TLS_KEY goes with TLS_CERT}"
             --tls-ca "${TLS_CA:?TLS_CA (the internal CA) goes with TLS_CERT}")
fi
if [[ "${ALLOW_INSECURE:-0}" == 1 ]]; then
  TLS_FLAGS+=(--allow-insecure)
fi
TOKEN_FLAGS=()
if [[ -n "${INTERNAL_TOKEN_FILE:-}" ]]; then
  TOKEN_FLAGS=(--internal-token-file "$INTERNAL_TOKEN_FILE")
fi
