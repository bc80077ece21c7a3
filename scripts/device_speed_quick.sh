#!/usr/bin/env bash
# Issue 11 in a short GPU session (under 10 device minutes left): the patched CUDA build, the synthetic Qwen3-4B shape
# (scripts/device_shapes.sh make; the vocabulary is .device/tools/ggml-vocab-qwen2.gguf, which scripts/device_bundle.sh
# takes from the pinned sdist, so no model is staged), test-backend-ops for our types under the build's defaults, and
# llama-bench tg128 / llama-batched-bench of ours against F16 and Q4_0, ours again under each variant named in VARIANTS
# (space-separated names of scripts/device_shapes.sh's variant_env: f32y0, norm0, pf0, kall, l32).
#   prep   carry .device/llama-src.tar.xz .device/whl .device/tools: wheels, source, the CUDA build and then the 4B
#          files, both in the background (the F16 file is written while the build runs)
#   run    waits for them (at most WAIT seconds, default 500), then tests and benches: $OUT/quick.md and raw logs
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p ~/shapes "$OUT"
W=~/shapes
# shellcheck source=scripts/device_common.sh
. "$(dirname "$0")"/device_common.sh
case ${1:-} in
prep)
  # a copy the build and the shapes run from: the working tree is re-laid by every call
  rm -rf ~/repo && mkdir ~/repo && cp -r quant2gguf kernels ggml_patches scripts pyproject.toml README.md .device/tools ~/repo/
  cp .device/llama-src.tar.xz ~/llama-src.tar.xz
  device_install .device/whl ~/repo || exit 1
  cd ~/repo && device_build ~/repo ~/llama-src.tar.xz $(( $(nproc) - 2 )) || exit 1
  # the F16 file needs no build; the quantized ones wait for llama-quantize
  setsid nohup bash -c "python3 tools/synth_gguf.py tools/ggml-vocab-qwen2.gguf $W/4b-F16.gguf.tmp 2560 9728 36 32 8 \
      && mv $W/4b-F16.gguf.tmp $W/4b-F16.gguf; while [ ! -e ~/logs/build.done ]; do sleep 2; done; \
      SHAPES='4b 2560 9728 36 32 8' TYPES='Q3_G128 Q4_0' FQKV_TYPES='Q3_G128' SYNTH=tools/synth_gguf.py \
      bash scripts/device_shapes.sh make tools/ggml-vocab-qwen2.gguf $W \$(. scripts/device_common.sh; device_bin); \
      touch ~/logs/shapes.done" </dev/null >~/logs/shapes.log 2>&1 &
  echo "build and shapes started"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
run)
  T0=$(date +%s)
  while [ ! -e ~/logs/shapes.done ] && [ $(( $(date +%s) - T0 )) -lt "${WAIT:-500}" ]; do sleep 3; done
  echo "waited $(( $(date +%s) - T0 )) s"; tail -3 ~/logs/llama-build.log; cat ~/logs/shapes.log
  B=$(device_bin); [ -x "$B/llama-bench" ] || { echo "no build"; exit 1; }
  M=$OUT/quick.md
  echo "# quick speed run, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F), $B" >"$M"
  for op in MUL_MAT MUL_MAT_VEC_FUSION Q3G_RMS_NORM_MUL_MAT GET_ROWS; do
    CUDA_VISIBLE_DEVICES=0 "$B/test-backend-ops" test -o $op -b CUDA0 -p q3_g >"$OUT/tbo-$op.log" 2>&1; rc=$?
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$OUT/tbo-$op.log")
    echo "- test-backend-ops $op rc=$rc: $(grep -c '): OK' <<<"$plain") OK, $(grep -c '): FAIL' <<<"$plain") FAIL" >>"$M"
  done
  f() { for x in "$@"; do [ -f "$W/4b-$x.gguf" ] && echo -m "$W/4b-$x.gguf"; done; }
  echo -e "\n## llama-bench tg128 -r 5, defaults\n" >>"$M"
  # shellcheck disable=SC2046
  CUDA_VISIBLE_DEVICES=0 "$B/llama-bench" -ngl 99 -p 0 -n 128 -r 5 -o md $(f F16 Q4_0 Q3_G128 Q3_G128-fqkv) 2>"$OUT/bench.log" | grep '^|' >>"$M"
  for v in ${VARIANTS:-}; do
    e=$(bash scripts/device_shapes.sh env "$v")
    echo -e "\n## llama-bench tg128 -r 5, ours with $e ($v)\n" >>"$M"
    # shellcheck disable=SC2046
    env "$e" CUDA_VISIBLE_DEVICES=0 "$B/llama-bench" -ngl 99 -p 0 -n 128 -r 5 -o md $(f Q3_G128 Q3_G128-fqkv) 2>>"$OUT/bench.log" | grep '^|' >>"$M"
  done
  echo -e "\n## llama-batched-bench, decode tok/s at 1/2/4/8 sequences\n" >>"$M"
  for x in Q4_0: Q3_G128: ${VARIANTS:+$(for v in $VARIANTS; do echo "Q3_G128:$v"; done)}; do
    t=${x%%:*} e=$(bash scripts/device_shapes.sh env "${x#*:}")
    r=$(env "$e" CUDA_VISIBLE_DEVICES=0 "$B/llama-batched-bench" -m "$W/4b-$t.gguf" -ngl 99 -c 4096 -npp 128 -ntg 128 -npl 1,2,4,8 \
          --output-format jsonl 2>>"$OUT/bench.log" | grep '^{"n_kv_max' | python3 -c "import sys, json; print(' '.join(str(round(json.loads(l)['speed_tg'])) for l in sys.stdin))")
    echo "- $t $e: $r" >>"$M"
  done
  cat "$M"
  ;;
*) echo "usage: $0 prep | run"; exit 2 ;;
esac
