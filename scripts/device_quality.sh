#!/usr/bin/env bash
# Method quality on the GPU machine: scripts/bench_methods.py (quantize + evaluate real fixtures).
# Expects, outside the repo copy (earlier calls of the same warm machine): ~/stage/<model>.gguf
# (device-bundle.sh chunks, sha256-checked) and ~/stage/whl/*.whl (datasets, dill, multiprocess,
# gguf: missing there); and the carried .device/data (news text, GSM templates from the cache).
# usage: scripts/device_quality.sh ARGS-FOR-bench_methods.py   (results: $OUT/methods*.json/.log)
set -u
REPO=$PWD
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
export QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$QUANT2GGUF_CACHE/gguf" "$QUANT2GGUF_CACHE/data"
[ -d .device/data ] && cp -rn .device/data/* "$QUANT2GGUF_CACHE/data/"
[ -f ~/stage/qwen05.gguf ] && ln -sf ~/stage/qwen05.gguf "$QUANT2GGUF_CACHE/gguf/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
[ -f ~/stage/smollm2.gguf ] && ln -sf ~/stage/smollm2.gguf "$QUANT2GGUF_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site ~/stage/whl/*.whl
export PYTHONPATH=/tmp/site
python3 -c "import quant2gguf.kernels" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
tag=${TAG:-methods}
[ $# -gt 0 ] && python3 scripts/bench_methods.py --workdir "$HOME/bench" --out "$OUT/$tag.json" "$@" 2>"$OUT/$tag.err" | tee "$OUT/$tag.log"
echo "rc=${PIPESTATUS[0]}"
grep -E "Error|error" "$OUT/$tag.err" | tail -5
# eval time on packed Triton kernels vs fp16 for a checkpoint the bench made (issue 4)
if [ -n "${PACKED_CKPT:-}" ]; then
  python3 scripts/bench_eval_packed.py "$PACKED_CKPT" --out "$OUT/eval_packed.json" 2>"$OUT/eval_packed.err" | tail -20
  grep -E "Error|error" "$OUT/eval_packed.err" | tail -5
fi
