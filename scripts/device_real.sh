#!/usr/bin/env bash
# A real model end to end on the GPU machine: quantize with a method (PyTorch + Triton), export our
# GGUF, and run it in the patched llama.cpp built with CUDA, against F16 and stock types (with and
# without our importance matrix) -- perplexity, KLD vs F16, decode tok/s, all in one bench run.
# Expects what scripts/device_env.sh says (staged by earlier calls of the same warm machine);
# carried: .device/llama-src.tar.xz (the pinned tree, device-bundle.sh).
# usage: scripts/device_real.sh prep   -- stage, start the CUDA build in the background, quantize
#        scripts/device_real.sh gguf   -- wait for the build, then scripts/bench_gguf.py --cuda
# env: MODEL (qwen05), METHOD (laquant), G (128). Results under $OUT.
set -u
. scripts/device_env.sh
MODEL=${MODEL:-qwen05} METHOD=${METHOD:-laquant} G=${G:-128}
CK=$HOME/bench/$MODEL-$METHOD-w3g$G
T0=$(date +%s)
wait_build() {  # until the background build is done or $1 s into this call
  while pgrep -f "quant2gguf llama build" >/dev/null && [ $(( $(date +%s) - T0 )) -lt "$1" ]; do sleep 5; done
  pgrep -f "quant2gguf llama build" >/dev/null && echo "build still running" || echo "build done"
  tail -c 400 "$HOME/llama-build.log" | tr '\r' '\n' | tail -3
}

case ${1:-prep} in
prep)
  # the pinned tree into the tool's own cache slot (no PyPI here), patched by the tool
  python3 -c "from quant2gguf import llama; print('source:', llama.source_dir('.device/llama-src.tar.xz'))" || exit 1
  setsid nohup python3 -m quant2gguf llama build --cuda >"$HOME/llama-build.log" 2>&1 < /dev/null &
  echo "CUDA build started (pid $!)"
  python3 scripts/bench_methods.py --workdir "$HOME/bench" --models "$MODEL:$G" --methods "$METHOD" --skip-fp \
    --ntokens 4096 --out "$OUT/quantize-$METHOD.json" 2>"$OUT/quantize.err" | tail -4
  ls "$CK" >/dev/null || { tail -20 "$OUT/quantize.err"; exit 1; }
  wait_build 500
  ;;
gguf)
  wait_build 400
  python3 scripts/bench_gguf.py "$CK" --cuda --outtype q8_0 --types Q4_0 Q3_K_S Q3_K_S+imat Q3_K_M+imat \
    --threads 8 --reps 3 --workdir "$HOME/gg" --out "$OUT/gguf-cuda.json" 2>"$OUT/gguf.err" | tail -16
  grep -iE "error|Traceback" "$OUT/gguf.err" | tail -5
  ;;
esac
