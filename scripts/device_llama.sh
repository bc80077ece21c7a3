#!/usr/bin/env bash
# Patched llama.cpp with CUDA on the GPU machine in phases, one per call:
#   build  — untar the pinned tree (.device/llama-src.tar.xz from device-bundle.sh), apply
#            ggml_patches/, build ggml-cuda + tools into ~/lcpp (survives while the machine is warm)
#   test   — test-backend-ops (CUDA vs CPU) for our types: MUL_MAT, GET_ROWS
#   bench  — decode speed at Qwen3-4B's shape: a random-weight F16 GGUF (.device/synth_gguf.py),
#            requantized by llama-quantize to our types and stock ones; llama-bench tg128, -ngl 99
#            (FUSE=1: each type also from the F16 with q/k/v fused by scripts/fuse_qkv_gguf.py)
# usage: scripts/device_llama.sh build|test|bench   (results under $OUT)
set -u
REPO=$PWD
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
L=$HOME/lcpp
SRC=$L/src
B=$L/build
phase=${1:-build}
export PYTHONPATH=${PYTHONPATH:-}

case $phase in
build)
  if [ ! -f "$SRC/.patched" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC" && tar -xJf .device/llama-src.tar.xz -C "$SRC" || exit 1
    for p in ggml_patches/*.patch; do
      (cd "$SRC" && GIT_CEILING_DIRECTORIES=$L git apply -p1 --whitespace=nowarn "$REPO/$p") || { echo "patch $p failed"; exit 1; }
    done
    touch "$SRC/.patched"
  fi
  t0=$(date +%s)
  cmake -S "$SRC" -B "$B" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=ON >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  cmake --build "$B" -j "${JOBS:-16}" --target ggml-cuda llama llama-bench llama-perplexity llama-completion \
    llama-quantize test-backend-ops >"$OUT/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "error|FAILED" "$OUT/build.log" | head -30
  exit $rc
  ;;
test)
  for op in MUL_MAT GET_ROWS; do
    timeout 240 "$B/bin/test-backend-ops" test -o $op -b CUDA0 -p "q3_g" >"$OUT/backend-ops-$op.log" 2>&1
    echo "$op rc=$?"; grep -E "q3_g" "$OUT/backend-ops-$op.log" | grep -vc OK | sed 's/^/  non-OK lines: /'
    grep -cE "q3_g.*OK" "$OUT/backend-ops-$op.log" | sed 's/^/  OK lines: /'
    tail -3 "$OUT/backend-ops-$op.log"
  done
  ;;
bench)
  W=$HOME/synth
  mkdir -p "$W"
  TYPES=${TYPES:-Q3_G128 Q3_G128P Q4_0 Q4_1 Q3_K_S Q3_K_M IQ3_S Q2_K}
  [ -f "$W/f16.gguf" ] || python3 .device/synth_gguf.py "$HOME/stage/smollm2.gguf" "$W/f16.gguf" 2560 9728 36 32 8 >"$OUT/synth.log" 2>&1 || { cat "$OUT/synth.log"; exit 1; }
  for t in $TYPES; do
    [ -f "$W/$t.gguf" ] || "$B/bin/llama-quantize" "$W/f16.gguf" "$W/$t.gguf" "$t" 16 >"$OUT/quantize-$t.log" 2>&1 || echo "quantize $t failed"
  done
  if [ "${FUSE:-0}" = 1 ]; then  # issue 11: every type again with q/k/v as one attn_qkv (one launch instead of three)
    [ -f "$W/f16-fqkv.gguf" ] || python3 scripts/fuse_qkv_gguf.py "$W/f16.gguf" "$W/f16-fqkv.gguf" >>"$OUT/synth.log" 2>&1
    for t in $TYPES; do
      [ -f "$W/$t-fqkv.gguf" ] || "$B/bin/llama-quantize" "$W/f16-fqkv.gguf" "$W/$t-fqkv.gguf" "$t" 16 >"$OUT/quantize-$t-fqkv.log" 2>&1 || echo "quantize $t (fused) failed"
    done
  fi
  files=""
  for t in F16 $TYPES; do
    f="$W/$t.gguf"; [ $t = F16 ] && f="$W/f16.gguf"
    [ -f "$f" ] && files="$files -m $f"
    f="$W/$t-fqkv.gguf"; [ $t = F16 ] && f="$W/f16-fqkv.gguf"
    [ -f "$f" ] && files="$files -m $f"
  done
  "$B/bin/llama-bench" $files -ngl 99 -n 128 -p 0 -r "${REPS:-5}" -o json >"$OUT/llama-bench.json" 2>"$OUT/llama-bench.err"
  echo "llama-bench rc=$?"
  python3 - "$OUT/llama-bench.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
f16 = next((r["avg_ts"] for r in rows if "F16" in r["model_type"]), None)
print("| type | size GiB | tg128 tok/s | x F16 |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['model_type']}{' (fused qkv)' if 'fqkv' in r['model_filename'] else ''} | {r['model_size'] / 2**30:.2f} | {r['avg_ts']:.0f} ± {r['stddev_ts']:.0f} | "
          f"{r['avg_ts'] / f16:.2f} |" if f16 else "")
EOF
  ;;
esac
