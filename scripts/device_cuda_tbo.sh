#!/usr/bin/env bash
# Issue 11 on the GPU machine, once the patched CUDA build exists (started by device_qwen15.sh prep, in the
# background, so it runs while the GPU is otherwise idle): test-backend-ops MUL_MAT / GET_ROWS for our types
# (CUDA against the CPU backend) and its perf mode for MUL_MAT at 4096 x 14336, batch 1..8, with the batch 2..8
# wrow kernel on and off (GGML_Q3G_MMVQ_WROW), with batch 1's float-activation path (the default) and without it
# (GGML_Q3G_MMVQ_F32Y=0, logs tbo-*-f32y0 / tbo-perf-wrowf32y0), its grid cap GGML_Q3G_F32Y_CTAS_PER_SM at 4 (the
# default), 2 and 8, F16 / Q4_0 / Q3_K / IQ3_S beside ours.
#   usage: scripts/device_cuda_tbo.sh CACHE OUT_DIR [IDLE_FILE]   (CACHE: $QUANT2GGUF_CACHE, holding
#   llama/build-*-cuda-*/bin; no repo needed: the device tool re-lays the working tree on every call while this waits)
#   IDLE_FILE: the perf part waits until it exists (the qwen15 job touches it once its GPU work is done: the ninth
#   run's perf numbers, taken beside training, were noise)
set -u
C=$1 O=$2 IDLE=${3:-}
mkdir -p "$O"
sleep 30  # let the build start
while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
B=$(ls -d "$C"/llama/build-*-cuda-*/bin 2>/dev/null | head -1)
[ -x "$B/test-backend-ops" ] || { echo "no CUDA build with test-backend-ops under $C/llama" >>"$O/tbo.log"; exit 1; }
T=$B/test-backend-ops
# MUL_MAT and the fused mat-vec calls (bias, gate/up + GLU: MUL_MAT_VEC_FUSION) with batch 1's float-activation
# path (the default: our mat-vec quantizes the activations itself, at every K) and without it (GGML_Q3G_MMVQ_F32Y=0);
# Q3G_RMS_NORM_MUL_MAT: the RMS norm left to the F32Y mat-vecs (the default; without F32Y the norm is launched);
# MUL_MAT with the batch 2..8 kernel at 32 lanes a row where K has fewer than 16 weight blocks too (GGML_Q3G_WROW_LPR16=0)
for op in MUL_MAT GET_ROWS MUL_MAT_VEC_FUSION Q3G_RMS_NORM_MUL_MAT MUL_MAT:f32y0 MUL_MAT_VEC_FUSION:f32y0 Q3G_RMS_NORM_MUL_MAT:f32y0 MUL_MAT:l32; do
  f=${op#*:}; op=${op%%:*}; [ "$f" = "$op" ] && f=; log=$O/tbo-test-$op${f:+-$f}.log
  GGML_Q3G_MMVQ_F32Y=$([ "$f" = f32y0 ] && echo 0 || echo 1) GGML_Q3G_WROW_LPR16=$([ "$f" = l32 ] && echo 0 || echo 1) \
    "$T" test -o $op -b CUDA0 -p q3_g >"$log" 2>&1; rc=$?
  plain=$(sed 's/\x1b\[[0-9;]*m//g' "$log")  # the counts ignore colour codes
  echo "test $op${f:+ $f} rc=$rc $(grep -c '): OK' <<<"$plain") OK $(grep -c '): FAIL' <<<"$plain") FAIL" >>"$O/tbo.log"
done
if [ -n "$IDLE" ]; then
  while [ ! -e "$IDLE" ]; do sleep 5; done
  echo "perf starts: $(date +%T), GPU $(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader)" >>"$O/tbo.log"
fi
# wrow on (1) / off (0), both with batch 1's F32Y path at its default grid cap (4 CTAs per SM), that cap at 2 and 8,
# and batch 1 without F32Y (f32y0; our types only)
for w in 1 0 f32y-c2 f32y-c8 f32y0; do
  case $w in f32y*) types='q3_g128|q3_g128p' ctas=${w#f32y-c};; *) types='q3_g128|q3_g128p|f16|q4_0|q3_K|iq3_s' ctas=4;; esac
  [ $w = f32y0 ] && ctas=4
  GGML_Q3G_MMVQ_F32Y=$([ $w = f32y0 ] && echo 0 || echo 1) GGML_Q3G_F32Y_CTAS_PER_SM=$ctas \
  GGML_Q3G_MMVQ_WROW=$([ $w = 0 ] && echo 0 || echo 1) \
    "$T" perf -o MUL_MAT -b CUDA0 -p "type_a=($types),.*n=[1-8]," \
    >"$O/tbo-perf-wrow$w.log" 2>&1; echo "perf wrow=$w rc=$?" >>"$O/tbo.log"
done
