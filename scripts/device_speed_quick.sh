#!/usr/bin/env bash
# Issue 11 in a short GPU session (under 10 device minutes left): the patched CUDA build, the synthetic Qwen3-4B shape
# (scripts/device_shapes.sh make; the vocabulary is .device/tools/ggml-vocab-qwen2.gguf, which scripts/device_bundle.sh
# takes from the pinned sdist, so no model is staged), test-backend-ops for our types under the build's defaults, and
# llama-bench tg128 / llama-batched-bench of ours against F16 and Q4_0, ours again under each environment of VARIANTS
# (NAME=ENV pairs, space-separated).
#   prep   carry .device/llama-src.tar.xz .device/whl .device/tools: wheels, source, the CUDA build and then the 4B
#          files, both in the background (the F16 file is written while the build runs)
#   run    waits for them (at most WAIT seconds, default 500), then tests and benches: $OUT/quick.md and raw logs
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p ~/logs ~/shapes "$OUT"
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache
W=~/shapes
bin() { ls -d "$QUANT2GGUF_CACHE"/llama/build-*-cuda-*/bin 2>/dev/null | head -1; }
case ${1:-} in
prep)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl || exit 1
  rm -rf ~/repo && mkdir ~/repo && cp -r quant2gguf kernels ggml_patches scripts pyproject.toml README.md .device/tools ~/repo/
  cd ~/repo && python3 -m pip install -q --no-deps --no-build-isolation -e . >~/logs/install.log 2>&1 || { tail ~/logs/install.log; exit 1; }
  cp "$OLDPWD/.device/llama-src.tar.xz" ~/llama-src.tar.xz
  SRC=$(python3 -c "from quant2gguf import llama; print(llama.source_dir('$HOME/llama-src.tar.xz'))") || exit 1
  echo "source: $SRC"
  setsid nohup bash -c "python3 -m quant2gguf llama build --cuda -j $(( $(nproc) - 2 )) >~/logs/llama-build.log 2>&1; touch ~/logs/build.done" \
    </dev/null >/dev/null 2>&1 &
  # the F16 file needs no build; the quantized ones wait for llama-quantize
  setsid nohup bash -c "python3 tools/synth_gguf.py tools/ggml-vocab-qwen2.gguf $W/4b-F16.gguf.tmp 2560 9728 36 32 8 \
      && mv $W/4b-F16.gguf.tmp $W/4b-F16.gguf; while [ ! -e ~/logs/build.done ]; do sleep 2; done; \
      SHAPES='4b 2560 9728 36 32 8' TYPES='Q3_G128 Q4_0' FQKV_TYPES='Q3_G128' SYNTH=tools/synth_gguf.py \
      bash scripts/device_shapes.sh make tools/ggml-vocab-qwen2.gguf $W \$(ls -d $QUANT2GGUF_CACHE/llama/build-*-cuda-*/bin | head -1); \
      touch ~/logs/shapes.done" </dev/null >~/logs/shapes.log 2>&1 &
  echo "build and shapes started"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
run)
  T0=$(date +%s)
  while [ ! -e ~/logs/shapes.done ] && [ $(( $(date +%s) - T0 )) -lt "${WAIT:-500}" ]; do sleep 3; done
  echo "waited $(( $(date +%s) - T0 )) s"; tail -3 ~/logs/llama-build.log; cat ~/logs/shapes.log
  B=$(bin); [ -x "$B/llama-bench" ] || { echo "no build"; exit 1; }
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
    echo -e "\n## llama-bench tg128 -r 5, ours with ${v#*=} ($v)\n" >>"$M"
    # shellcheck disable=SC2046
    env "${v#*=}" CUDA_VISIBLE_DEVICES=0 "$B/llama-bench" -ngl 99 -p 0 -n 128 -r 5 -o md $(f Q3_G128 Q3_G128-fqkv) 2>>"$OUT/bench.log" | grep '^|' >>"$M"
  done
  echo -e "\n## llama-batched-bench, decode tok/s at 1/2/4/8 sequences\n" >>"$M"
  for x in Q4_0:X=1 Q3_G128:X=1 ${VARIANTS:+$(for v in $VARIANTS; do echo "Q3_G128:${v#*=}"; done)}; do
    t=${x%%:*} e=${x#*:}
    r=$(env "$e" CUDA_VISIBLE_DEVICES=0 "$B/llama-batched-bench" -m "$W/4b-$t.gguf" -ngl 99 -c 4096 -npp 128 -ntg 128 -npl 1,2,4,8 \
          --output-format jsonl 2>>"$OUT/bench.log" | grep '^{"n_kv_max' | python3 -c "import sys, json; print(' '.join(str(round(json.loads(l)['speed_tg'])) for l in sys.stdin))")
    echo "- $t $e: $r" >>"$M"
  done
  cat "$M"
  ;;
*) echo "usage: $0 prep | run"; exit 2 ;;
esac
