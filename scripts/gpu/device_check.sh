#!/usr/bin/env bash
# The GPU checks of the kernel and benchmark issues, in one call on a GPU machine:
#   tests     the GPU kernel tests, compiled for the GPU (SPLITSERVE_TEST_PLATFORM=cuda)
#   kernels   scripts/bench_kernels.py --tune: kernels against the measured ceilings and the peers
#   roofline  scripts/bench/bench_roofline.py: decode step of a 1.1B Llama (random weights), bf16,
#             batch 64, with the plain-JAX reference attention and with our GPU kernel
# Run from the repository root with the machine's python3 (JAX with CUDA); splitserve is put on
# the path through a folder of links, not installed. Logs and JSON go to $OUT
# (default /tmp/device_check); the last lines printed are the tables.
#   OUT=/tmp/dc scripts/gpu/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv \
  > "$OUT/env.txt" 2>&1
ns=$(mktemp -d)
mkdir -p "$ns/splitserve"
cp splitserve_pkg/__init__.py "$ns/splitserve/"
for d in models pallas_kernels protos runtime scripts; do ln -s "$PWD/$d" "$ns/splitserve/$d"; done
export PYTHONPATH="$ns"
# Packages the image lacks or holds in too old a version travel as wheels in .whl/ (carried).
if ! $PY -c "import splitserve.runtime.model_runner" >> "$OUT/env.txt" 2>&1 && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$OUT/env.txt" 2>&1
  export PYTHONPATH="/tmp/site:$ns"
fi
$PY -c "import jax, flax, google.protobuf as pb; print('jax', jax.__version__, 'flax', flax.__version__, \
'protobuf', pb.__version__, jax.devices())" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

worst=0  # the exit status: the first failing step's
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  if [ "$worst" -eq 0 ]; then worst=$rc; fi
}

[ -n "${SKIP_TESTS:-}" ] || step tests "${TESTS_S:-150}" env SPLITSERVE_TEST_PLATFORM=cuda $PY -m pytest -q -p no:cacheprovider \
  ${TESTS_FILES:-tests/test_kernels_paged.py tests/test_kernels_flash.py tests/test_kernels_offsets.py tests/test_model_kernels.py} \
  -k "${TESTS_K:-gpu or custom_scale}"
# shellcheck disable=SC2086  # KERNELS_ARGS is a list of flags
[ -n "${SKIP_KERNELS:-}" ] || step kernels "${KERNELS_S:-200}" $PY scripts/bench_kernels.py ${KERNELS_ARGS:---tune} --json-out "$OUT/kernels_gpu.json"
# shellcheck disable=SC2086  # ROOFLINE_ARGS is a list of flags
step roofline "${ROOFLINE_S:-150}" $PY scripts/bench/bench_roofline.py --platform gpu --models llama1b \
  --dtype bfloat16 --batches 64 --copy-mib 2048 ${ROOFLINE_ARGS:---contexts 512 2048 --attention-impls reference gpu} \
  --json-out "$OUT/roofline_gpu.json"

[ -n "${SKIP_TESTS:-}" ] || tail -n 15 "$OUT/tests.log"
[ -n "${SKIP_KERNELS:-}" ] || grep -E "^\||TB/s|Error" "$OUT/kernels.log" | cut -c1-220
grep -E "^\||copy|Error" "$OUT/roofline.log" | cut -c1-220
exit "$worst"
