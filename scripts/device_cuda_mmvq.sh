#!/usr/bin/env bash
# Q3_G128 mat-vec microbenchmark on the GPU machine (issue 11), from the repo root, < 2 min:
# compile scripts/cuda_q3g_mmvq_bench.cu (nvcc -arch=native, fallback sm_90), run it, keep the JSON lines.
#   scripts/device_cuda_mmvq.sh [RESULT.jsonl]     (default $OUT/cuda_mmvq.jsonl; env.txt, build.log, run.log beside it)
#   BENCH_ARGS="--quick" or "--only tile16k" pass through to the binary (q4_* variants: batch 1 only). A crash of the full run falls back to
#   one process per variant (model lines are then missing: sum the shape lines).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
RES=${1:-$OUT/cuda_mmvq.jsonl}
DIR=$(dirname "$RES")
mkdir -p "$DIR"
T0=$(date +%s)
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
BIN=$(mktemp -d)/q3g_mmvq_bench
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version --format=csv
  "$NVCC" --version | tail -n 2
} >"$DIR/env.txt" 2>&1
cat "$DIR/env.txt"

# -arch=native needs a visible GPU at compile time; sm_90 covers H100/H200 if that fails
build() { timeout 240 "$NVCC" -O3 -std=c++17 -arch="$1" -Xptxas -v scripts/cuda_q3g_mmvq_bench.cu -o "$BIN"; }
if ! build native >"$DIR/build.log" 2>&1; then
  echo "== -arch=native failed, retrying sm_90" | tee -a "$DIR/build.log"
  build sm_90 >>"$DIR/build.log" 2>&1 || { tail -n 30 "$DIR/build.log"; exit 1; }
fi
echo "build ok ($(( $(date +%s) - T0 )) s)"

timeout $(( 110 - ($(date +%s) - T0) > 30 ? 110 - ($(date +%s) - T0) : 30 )) "$BIN" ${BENCH_ARGS:-} >"$RES" 2>"$DIR/run.log"
RC=$?
# rc 3 = some checks failed (results still complete); anything else = a crash or timeout: rerun each
# variant in its own process so one faulting kernel does not hide the others
if [ "$RC" != 0 ] && [ "$RC" != 3 ] && [ -z "${BENCH_ARGS:-}" ]; then
  echo "== full run rc=$RC; per-variant reruns" | tee -a "$DIR/run.log"
  mv "$RES" "$RES.partial"
  for v in f16 cur wrow_r1 wrow_r2 wrow_r4 tile16k tile32k tile16k_r2 tile8k_w4 \
           q4_ldg q4_ldg_auto q4_cpa_auto q4il_auto_repack; do
    LEFT=$(( 170 - ($(date +%s) - T0) )); [ "$LEFT" -lt 10 ] && break
    timeout "$LEFT" "$BIN" --only "$v" --iters 100 2>>"$DIR/run.log" | grep -v '"model"' | \
      { if [ "$v" = f16 ]; then cat; else grep -v '"variant":"f16"'; fi; } >>"$RES"
    echo "$v rc=${PIPESTATUS[0]}" | tee -a "$DIR/run.log"
  done
fi
echo "bench rc=$RC ($(( $(date +%s) - T0 )) s); $(grep -c '"variant"' "$RES") result lines in $RES"
tail -n 5 "$DIR/run.log"
# short summary: per batch, the matvec time per decode step and the speedup over F16 for each variant
grep '"model"' "$RES" || true
grep -E '"ok":false|checks_failed|roof' "$RES" | head -20
exit $RC
