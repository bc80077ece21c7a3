#!/usr/bin/env bash
# Issue 11 at the shapes the fixtures lack, on one GPU: random-weight llama GGUFs of Qwen3-4B's shape (hidden 2560,
# ffn 9728, 36 layers, 32/8 heads) and Qwen3-8B's (4096, 12288, 36 layers, 32/8 heads) with Qwen's 151,936-token
# vocabulary taken from SRC (synth_gguf.py of ../shared/tools, carried by the prep call in .device/tools), the F16
# file requantized by llama-quantize to ours and stock types: decode speed does not depend on the values, so the C RTN
# reference quantizer is enough for ours.
#   make  SRC.gguf DIR BIN      DIR/{05b,4b,8b}-{F16,Q3_G128,Q4_0,Q3_K_S}.gguf, DIR/4b-IQ3_S.gguf, and at 4B the F16, Q3_G128
#                               and Q4_0 files with q/k/v fused into one attn_qkv (*-fqkv.gguf, scripts/fuse_qkv_gguf.py)
#                               (CPU only; run it while the GPU trains, on CPUs nothing else uses)
#   bench DIR BIN OUT           per shape one llama-bench (tg128 and pp512, -r 3, all layers on the GPU) over every file,
#                               and llama-batched-bench decode at 1/2/4/8 sequences for F16, Q4_0 and ours (fused too):
#                               OUT/llama-bench-{05b,4b,8b}.json, OUT/batched-bench-shapes.jsonl; ours again without batch
#                               1's float-activation path, GGML_Q3G_MMVQ_F32Y=0 (OUT/llama-bench-*-f32y0.json, batched
#                               rows *-f32y0.gguf), with the RMS norms launched rather than left to it,
#                               GGML_Q3G_F32Y_NORM=0 (OUT/llama-bench-*-norm0.json), without the L2 prefetch of the
#                               first weight rows, GGML_Q3G_PREFETCH=0 (-pf0), and with F32Y at every K, the 4B down
#                               matrix too (-kall: GGML_Q3G_F32Y_MAX_K past any K); where ncu exists, each
#                               kernel's time over ~one token of a 4B and an 8B decode (OUT/ncu-*.csv, read by
#                               scripts/ncu_breakdown.py)
#   ncu BIN FILE.gguf OUT.csv   that per-kernel profile of one file, under the caller's environment (the methods job's
#                               qwen15 rows)
#   env NAME                    the environment of variant NAME (variant_env; the methods job's variants too)
# The achieved bandwidth (file bytes x tok/s) is read against the copy roof that scripts/device_cuda_mmvq.sh measures.
set -u
# NAME hidden ffn layers heads kv_heads; SHAPES="tiny 256 512 2 4 2" for a check on a CPU machine. 05b is
# Qwen2.5-0.5B's shape: K = 896 is 7 weight blocks a row, where batch 1's F32Y path has not been timed
if [ -n "${SHAPES:-}" ]; then SHAPES=("$SHAPES"); else SHAPES=("05b 896 4864 24 14 2" "4b 2560 9728 36 32 8" "8b 4096 12288 36 32 8"); fi
# the environment of a variant of our files: f32y0 (no float-activation path at batch 1), norm0 (the RMS norms
# launched, not left to it), pf0 (no L2 prefetch of the first weight rows), kall (F32Y at every K: the down matrices
# of qwen15 and the Qwen3-4B shape, K > 8192 on fewer than 3 CTAs an SM, too), l32 (the batch 2..8 kernel with 32
# lanes a row below 16 weight blocks too), anything else (the defaults)
variant_env() {
  case $1 in f32y0) echo GGML_Q3G_MMVQ_F32Y=0;; norm0) echo GGML_Q3G_F32Y_NORM=0;; pf0) echo GGML_Q3G_PREFETCH=0;; kall) echo GGML_Q3G_F32Y_MAX_K=1000000000;; l32) echo GGML_Q3G_WROW_LPR16=0;; *) echo GGML_Q3G_MMVQ_F32Y=1;; esac
}
# where a decode step's time goes, per kernel (Nsight Compute: the H200 machines have ncu, not nsys): 700 launches (a
# bit over one token: ~19 kernels x 36 layers) after the first 900, each kernel timed alone (ncu serializes them),
# caches and clocks as they are; seconds a file. ncu_profile BIN FILE.gguf OUT.csv
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
ncu_profile() {
  timeout 200 "$NCU" --metrics gpu__time_duration.sum --cache-control none --clock-control none \
    --launch-skip 900 --launch-count 700 --csv "$1/llama-bench" -m "$2" -p 0 -n 6 -r 1 -ngl 99 >"$3" 2>>"$(dirname "$3")/ncu.log"
}
case ${1:-} in
make)
  SRC=$2 W=$3 B=$4
  SYNTH=${SYNTH:-$HOME/stage/tools/synth_gguf.py}
  [ -f "$SYNTH" ] || { echo "no $SYNTH: carry .device/tools (scripts/device_bundle.sh copies ../shared/tools/synth_gguf.py)"; exit 1; }
  mkdir -p "$W"
  quant() {  # quant SRC.gguf NAME TYPE: llama-quantize SRC into W/NAME.gguf (temp name, then rename) unless it exists
    [ -f "$W/$2.gguf" ] && return
    "$B/llama-quantize" "$1" "$W/$2.gguf.tmp" "$3" "$(nproc)" >"$W/quantize-$2.log" 2>&1 \
      && mv "$W/$2.gguf.tmp" "$W/$2.gguf" || echo "quantize $2 failed (see $W/quantize-$2.log)"
  }
  for shape in "${SHAPES[@]}"; do
    # shellcheck disable=SC2086
    set -- $shape
    n=$1
    [ -f "$W/$n-F16.gguf" ] || python3 "$SYNTH" "$SRC" "$W/$n-F16.gguf.tmp" "$2" "$3" "$4" "$5" "$6" >/dev/null || exit 1
    [ -f "$W/$n-F16.gguf" ] || mv "$W/$n-F16.gguf.tmp" "$W/$n-F16.gguf"
    types=${TYPES:-Q3_G128 Q4_0 Q3_K_S}  # TYPES / FQKV_TYPES: fewer files where device time is short
    [ "$n" = 4b ] && [ -z "${TYPES:-}" ] && types="$types IQ3_S"  # IQ3_S's search is slow: one shape
    for t in $types; do quant "$W/$n-F16.gguf" "$n-$t" "$t"; done
    if [ "$n" = "${SHAPES_FUSE:-4b}" ]; then  # q/k/v as one attn_qkv (scripts/fuse_qkv_gguf.py), then the same types
      [ -f "$W/$n-F16-fqkv.gguf" ] || { python3 "$(dirname "$0")/fuse_qkv_gguf.py" "$W/$n-F16.gguf" "$W/$n-F16-fqkv.gguf.tmp" \
        >"$W/fuse-$n.log" 2>&1 && mv "$W/$n-F16-fqkv.gguf.tmp" "$W/$n-F16-fqkv.gguf"; } || echo "fuse $n failed (see $W/fuse-$n.log)"
      [ -f "$W/$n-F16-fqkv.gguf" ] && for t in ${FQKV_TYPES:-Q3_G128 Q4_0}; do quant "$W/$n-F16-fqkv.gguf" "$n-$t-fqkv" "$t"; done
    fi
    echo "shape $n ready: $(cd "$W" && ls $n-*.gguf | tr '\n' ' ')"
  done
  ;;
bench)
  W=$2 B=$3 O=$4
  mkdir -p "$O"
  for n in $(printf '%s\n' "${SHAPES[@]}" | cut -d' ' -f1); do
    [ -f "$W/$n-F16.gguf" ] || { echo "shape $n not made"; continue; }
    # shellcheck disable=SC2046
    "$B/llama-bench" -ngl 99 -t 4 -p 512 -n 128 -r 3 -o json $(for f in "$W/$n"-*.gguf; do echo -m "$f"; done) \
      >"$O/llama-bench-$n.json" 2>"$O/llama-bench-$n.log"
    echo "llama-bench $n rc=$?"
    # our files again with GGML_Q3G_MMVQ_F32Y=0 (a quantize kernel before each batch-1 mat-vec, as before F32Y became
    # the default), with GGML_Q3G_F32Y_NORM=0 (the RMS norms launched, not left to the F32Y mat-vecs) and with
    # GGML_Q3G_PREFETCH=0 and with F32Y at every K (kall), linked under -f32y0 / -norm0 / -pf0 / -kall names in
    # folders of their own so that their rows stay apart
    for s in f32y0 norm0 pf0 kall; do
      e=$(variant_env $s)
      mkdir -p "$W/$s"
      for t in Q3_G128 Q3_G128-fqkv; do [ -f "$W/$n-$t.gguf" ] && ln -sf "../$n-$t.gguf" "$W/$s/$n-$t-$s.gguf"; done
      # shellcheck disable=SC2046
      env "$e" "$B/llama-bench" -ngl 99 -t 4 -p 512 -n 128 -r 3 -o json $(for f in "$W/$s/$n"-*.gguf; do echo -m "$f"; done) \
        >"$O/llama-bench-$n-$s.json" 2>"$O/llama-bench-$n-$s.log"
      echo "llama-bench $n $e rc=$?"
    done
    for t in F16 Q4_0 Q3_G128 Q4_0-fqkv Q3_G128-fqkv f32y0/$n-Q3_G128-f32y0 f32y0/$n-Q3_G128-fqkv-f32y0 \
             pf0/$n-Q3_G128-pf0 pf0/$n-Q3_G128-fqkv-pf0; do
      case $t in */*) f=$W/$t.gguf name=${t#*/}.gguf;; *) f=$W/$n-$t.gguf name=$n-$t.gguf;; esac
      [ -f "$f" ] || continue
      env $(variant_env "${t%/*}") "$B/llama-batched-bench" -m "$f" -t 4 -ngl 99 -c 4096 -npp 128 -ntg 128 -npl 1,2,4,8 \
        --output-format jsonl 2>>"$O/batched-bench-shapes.log" | grep '^{"n_kv_max' \
        | sed "s|^{|{\"file\": \"$name\", |" >>"$O/batched-bench-shapes.jsonl"
    done
  done
  # per kernel (ncu_profile), where the machine has ncu
  if [ -n "$NCU" ]; then
    for v in 4b-F16: 4b-Q4_0: 4b-Q3_G128: 4b-Q3_G128:f32y0 4b-Q3_G128:norm0 4b-Q3_G128:pf0 4b-Q3_G128:kall 4b-Q3_G128-fqkv: 8b-Q4_0: 8b-Q3_G128: 8b-Q3_G128:pf0; do
      t=${v%:*} s=${v#*:}; [ -f "$W/$t.gguf" ] || continue
      (export $(variant_env "$s"); ncu_profile "$B" "$W/$t.gguf" "$O/ncu-$t${s:+-$s}.csv")
      echo "ncu $t ${s:-default} rc=$?"
    done
  else
    echo "no ncu on this machine: no per-kernel profile"
  fi
  ;;
ncu)
  [ -n "$NCU" ] || { echo "no ncu on this machine: no per-kernel profile"; exit 0; }
  ncu_profile "$2" "$3" "$4"
  ;;
env) variant_env "$2" ;;
*) echo "usage: $0 make SRC.gguf DIR BIN | bench DIR BIN OUT | ncu BIN FILE.gguf OUT.csv | env NAME"; exit 2 ;;
esac
