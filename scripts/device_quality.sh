#!/usr/bin/env bash
# Method quality on the GPU machine: scripts/bench_methods.py (quantize + evaluate real fixtures).
# Expects what scripts/device_env.sh says (staged by earlier calls of the same warm machine).
# usage: scripts/device_quality.sh ARGS-FOR-bench_methods.py   (results: $OUT/methods*.json/.log)
set -u
. scripts/device_env.sh
tag=${TAG:-methods}
[ $# -gt 0 ] && python3 scripts/bench_methods.py --workdir "$HOME/bench" --out "$OUT/$tag.json" "$@" 2>"$OUT/$tag.err" | tee "$OUT/$tag.log"
echo "rc=${PIPESTATUS[0]}"
grep -E "Error|error" "$OUT/$tag.err" | tail -5
# eval time on packed Triton kernels vs fp16 for a checkpoint the bench made (issue 4)
if [ -n "${PACKED_CKPT:-}" ]; then
  python3 scripts/bench_eval_packed.py "$PACKED_CKPT" --out "$OUT/eval_packed.json" 2>"$OUT/eval_packed.err" | tail -20
  grep -E "Error|error" "$OUT/eval_packed.err" | tail -5
fi
